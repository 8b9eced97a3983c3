"""Shared fixtures: tiny models and an offline tokenizer, built in memory in a second or two, and
``render_partial``, which renders an analysis's report partial exactly as a run does.

Nothing here touches the network: the tokenizer is a byte-level BPE trained on text from the
standard library (``pydoc_data``), and the models are randomly initialised.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from runner.artifacts import RunFolder
from runner.reports import CaseView, PlotView, environment
from runner.results import result_bytes, result_from_files
from runner.step import StepOutput

TINY_VOCAB = 320
SPECIAL_TOKENS = ["<|endoftext|>", "<|bos|>", "<|pad|>"]  # ids 0, 1, 2


def _training_text() -> str:
    from pydoc_data.topics import topics

    return "\n".join(topics[key] for key in sorted(topics)[:40])


@pytest.fixture(autouse=True)
def _own_results_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets an empty result cache (runner/cache.py), so no test reuses another's results,
    nor the user's; subprocesses inherit it. The model weight cache stays shared."""
    monkeypatch.setenv("RUNNER_RESULTS_CACHE", str(tmp_path_factory.mktemp("results-cache")))


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer (320 tokens) saved with ``save_pretrained``.

    Saved and reloaded rather than kept in memory: TransformerLens reloads a tokenizer from its
    ``name_or_path`` (to get one that adds BOS), which needs a directory.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([_training_text()], trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|bos|>", pad_token="<|pad|>"
    )
    directory = tmp_path_factory.mktemp("tiny_tokenizer")
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir: Path) -> Any:
    """The tiny tokenizer, loaded from its directory (works offline)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer: Any) -> Any:
    """A ``LoadedModel`` around a random 2-layer GPT-2-style ``HookedTransformer``."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from runner.models import LoadedModel

    cfg = HookedTransformerConfig(
        model_name="tiny",
        n_layers=2,
        d_model=32,
        d_mlp=64,
        n_heads=4,
        d_head=8,
        n_ctx=64,
        d_vocab=len(tiny_tokenizer),
        act_fn="gelu",
        normalization_type="LN",
        seed=0,
        device="cpu",
    )
    model = HookedTransformer(cfg, tokenizer=tiny_tokenizer).eval()
    info = {"kind": "fixture", "location": "tests/conftest.py", "n_layers": 2, "d_model": 32, "d_mlp": 64}
    return LoadedModel("tiny", model, tiny_tokenizer, "random tiny model (tests/conftest.py)", info)


@pytest.fixture(scope="session")
def tiny_llama(tiny_tokenizer: Any) -> Any:
    """A random transformers ``LlamaForCausalLM``: grouped KV heads, RoPE theta 50000, random norms."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=0,
        pad_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms start at exactly 1, which would hide a norm-conversion bug
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_llama: Any, tiny_tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama saved as a transformers checkpoint directory (weights + tokenizer)."""
    directory = tmp_path_factory.mktemp("tiny_llama_checkpoint")
    tiny_llama.save_pretrained(directory)
    tiny_tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_gguf(
    tiny_llama: Any, tiny_tokenizer: Any, tiny_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The tiny Llama as a float32 GGUF file, laid out as llama.cpp's converter writes it."""
    path = tmp_path_factory.mktemp("tiny_gguf") / "Tiny-Llama.F32.gguf"
    merges = json.loads((tiny_tokenizer_dir / "tokenizer.json").read_text())["model"]["merges"]
    _write_llama_gguf(path, tiny_llama, tiny_tokenizer, [" ".join(m) for m in merges])
    return path


def _write_llama_gguf(path: Path, model: Any, tokenizer: Any, merges: list[str]) -> None:
    import gguf

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny test llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([3 if token in SPECIAL_TOKENS else 1 for token, _ in vocab])  # 3: control
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    for name, tensor in _gguf_tensors(model).items():
        writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _gguf_tensors(model: Any) -> dict[str, np.ndarray]:
    cfg = model.config
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    tensors = {
        "token_embd.weight": sd["model.embed_tokens.weight"],
        "output_norm.weight": sd["model.norm.weight"],
        "output.weight": sd["lm_head.weight"],
    }
    names = {
        "attn_norm": "input_layernorm",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_norm": "post_attention_layernorm",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    for layer in range(cfg.num_hidden_layers):
        hf = f"model.layers.{layer}."
        for gguf_name, hf_name in names.items():
            tensors[f"blk.{layer}.{gguf_name}.weight"] = sd[f"{hf}{hf_name}.weight"]
        # llama.cpp stores Q and K rows permuted (interleaved rotary halves); transformers undoes it.
        q, k = sd[f"{hf}self_attn.q_proj.weight"], sd[f"{hf}self_attn.k_proj.weight"]
        tensors[f"blk.{layer}.attn_q.weight"] = _llama_cpp_permute(q, cfg.num_attention_heads)
        tensors[f"blk.{layer}.attn_k.weight"] = _llama_cpp_permute(k, cfg.num_key_value_heads)
    return tensors


def _llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    rows = weight.shape[0]
    return (
        weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:])  # (head, half, pair, d_model)
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


@pytest.fixture
def render_partial(tmp_path: Path) -> Callable[..., str]:
    """``render_partial(output, "<analysis>.md.j2", step_id="case")``: a report partial as a run renders it.

    The case's files are written into ``tmp_path`` by the run's own writers (``data/<step id>/``,
    ``plots/<step id>/``, the case id being the step id as for an unswept step), the case is the
    report's :class:`CaseView` with :class:`PlotView` plots (real PNG data URIs), and the template
    comes from :func:`runner.reports.environment` (the real ``fmt`` filter, HTML autoescaping).
    The summary comes from the result as the run folder stores it (``results/<case>.json`` + NPZ),
    which must give back an equal result: every analysis' partial test checks its result's round trip.
    """

    def render(output: StepOutput, template: str, *, step_id: str = "case") -> str:
        stored = result_from_files(type(output.result), *result_bytes(output.result))
        assert stored == output.result, "the result does not survive its JSON and NPZ files"
        folder = RunFolder(tmp_path)
        plots = [PlotView(Path(p).stem, p, tmp_path) for p in folder.write_plots(step_id, output.plots)]
        case = CaseView(
            id=step_id,
            step_id=step_id,
            analysis=template.split(".")[0],
            description="",
            status="passed",
            duration=0.0,
            params={},
            sweep_values={},
            summary=stored.summary(),
            notes=list(output.notes),
            checks=[],
            error=None,
            traceback=None,
            plots=plots,
            data_files=folder.write_data(step_id, output.data),
        )
        return environment().get_template(f"analyses/{template}").render(case=case)

    return render
