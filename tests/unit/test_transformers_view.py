"""transformers_view(loaded): the same model as a transformers model, sharing the down projections.

Models named by Hugging Face id are loaded the way runner loads them, through TransformerLens, from
a local Hugging Face cache made in the test: tiny random checkpoints saved under the real repository
names (gpt2, EleutherAI/pythia-14m, mistralai/Mistral-7B-v0.1, allenai/OLMo-1B-hf), with the hub
switched off. Every expected number comes from the original transformers model, edited by hand in
its own layout, never from the view.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from analyses._transformers_view import transformers_view
from analyses._weights import SuperWeight, zeroed
from runner.errors import ResourceError
from runner.models import LoadedModel, hooked_llama_from_hf, load_model

REVISION = "0" * 40
HUB_MODELS = {
    # spec name → (repository the HF cache holds, architecture)
    "gpt2-small": ("gpt2", "gpt2"),
    "EleutherAI/pythia-14m": ("EleutherAI/pythia-14m", "neox"),
    "mistralai/Mistral-7B-v0.1": ("mistralai/Mistral-7B-v0.1", "mistral"),
}


def tiny_checkpoint(architecture: str, vocab: int) -> Any:
    """A random 2-layer transformers model; norms are random too, so a norm mix-up would show."""
    import transformers as tf

    special = {"bos_token_id": 1, "eos_token_id": 0, "pad_token_id": 2}
    sizes = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
    configs = {
        "gpt2": lambda: tf.GPT2Config(
            vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64, n_ctx=64
        ),
        "neox": lambda: tf.GPTNeoXConfig(vocab_size=vocab, max_position_embeddings=64, **sizes),
        "mistral": lambda: tf.MistralConfig(
            vocab_size=vocab, num_key_value_heads=2, max_position_embeddings=64, sliding_window=4096, **sizes
        ),
        "olmo": lambda: tf.OlmoConfig(vocab_size=vocab, max_position_embeddings=64, **sizes),
    }
    config = configs[architecture]()
    for key, value in special.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                param.uniform_(0.5, 1.5) if name.endswith("weight") else param.uniform_(-0.5, 0.5)
    return model


def put_in_cache(cache: Path, repo: str, model: Any, tokenizer: Any) -> None:
    """Lay out ``model`` as the Hugging Face cache holds a downloaded repository."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / REVISION
    model.save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(REVISION)


def use_cache(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    """Point huggingface_hub (and so transformers) at ``cache``, with the hub off."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> Iterator[dict[str, Any]]:
    """A local Hugging Face cache of tiny checkpoints under real names; the originals by spec name."""
    cache = tmp_path_factory.mktemp("hf_cache")
    originals = {}
    for name, (repo, architecture) in HUB_MODELS.items():
        originals[name] = tiny_checkpoint(architecture, len(tiny_tokenizer))
        put_in_cache(cache, repo, originals[name], tiny_tokenizer)
    with pytest.MonkeyPatch.context() as monkeypatch:
        use_cache(monkeypatch, cache)
        yield originals


@pytest.fixture(scope="module")
def hub_models(hub: dict[str, Any]) -> dict[str, LoadedModel]:
    """Each hub name loaded exactly as a spec naming it loads it (TransformerLens, local cache)."""
    return {name: load_model(name, device="cpu") for name in hub}


@pytest.fixture(scope="module")
def olmo(hub: dict[str, Any], tiny_tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """A tiny OLMo as TransformerLens loads allenai/OLMo-1B-hf, with that name's checkpoint cached.

    TransformerLens takes OLMo-1B's sizes from its own table, not from the checkpoint, so the tiny
    model is converted here with that table's settings at tiny sizes and its weight conversion.
    """
    from huggingface_hub import constants
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_olmo_weights

    original = tiny_checkpoint("olmo", len(tiny_tokenizer))
    put_in_cache(Path(constants.HF_HUB_CACHE), "allenai/OLMo-1B-hf", original, tiny_tokenizer)
    cfg = HookedTransformerConfig(
        d_model=32,
        d_head=8,
        n_heads=4,
        d_mlp=64,
        n_layers=2,
        n_ctx=64,
        eps=1e-5,
        d_vocab=len(tiny_tokenizer),
        act_fn="silu",
        normalization_type="LN",
        positional_embedding_type="rotary",
        rotary_base=10000.0,
        rotary_dim=8,
        gated_mlp=True,
        original_architecture="OlmoForCausalLM",
        device="cpu",
    )
    model = HookedTransformer(cfg, tokenizer=tiny_tokenizer)
    model.load_state_dict(model.fill_missing_keys(convert_olmo_weights(original, cfg)), strict=True)
    info = {"kind": "hf-hub", "location": "allenai/OLMo-1B-hf"}
    loaded = LoadedModel("allenai/OLMo-1B-hf", model.eval(), tiny_tokenizer, "tiny OLMo", info)
    hub["allenai/OLMo-1B-hf"] = original
    return loaded


@pytest.fixture(scope="module")
def llama(tiny_llama: Any, tiny_tokenizer: Any) -> LoadedModel:
    """The tiny Llama as the GGUF loader makes it: converted to TransformerLens, no checkpoint behind it."""
    model = hooked_llama_from_hf(copy.deepcopy(tiny_llama), tiny_tokenizer)
    return LoadedModel("tiny-llama", model, tiny_tokenizer, "tiny llama", {"kind": "gguf-file"})


@pytest.fixture(scope="module")
def local_llama(tiny_llama_dir: Path) -> LoadedModel:
    """The tiny Llama loaded from its checkpoint directory."""
    return load_model(str(tiny_llama_dir), device="cpu")


ALL = [*HUB_MODELS, "allenai/OLMo-1B-hf", "tiny-llama", "local-llama"]


@pytest.fixture
def case(
    request: pytest.FixtureRequest,
    hub: dict[str, Any],
    hub_models: dict[str, LoadedModel],
    olmo: LoadedModel,
    llama: LoadedModel,
    local_llama: LoadedModel,
    tiny_llama: Any,
) -> tuple[LoadedModel, Any]:
    """(the loaded model, the original transformers model it was made from), by name."""
    name = request.param
    if name == "tiny-llama":
        return llama, tiny_llama
    if name == "local-llama":
        return local_llama, tiny_llama
    if name == "allenai/OLMo-1B-hf":
        return olmo, hub[name]
    return hub_models[name], hub[name]


def tokens() -> torch.Tensor:
    return torch.randint(3, 320, (2, 12), generator=torch.Generator().manual_seed(1))  # (batch, pos)


def logits(model: Any, batch: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(batch)
    return out if isinstance(out, torch.Tensor) else out.logits


def zero_by_hand(original: Any, weight: SuperWeight) -> Any:
    """A copy of the transformers model with ``down_proj.weight[row, col]`` zeroed in its own layout."""
    edited = copy.deepcopy(original)
    arch = type(edited).__name__
    with torch.no_grad():
        if arch == "GPT2LMHeadModel":  # Conv1D stores (d_mlp, d_model)
            edited.transformer.h[weight.layer].mlp.c_proj.weight[weight.col, weight.row] = 0.0
        elif arch == "GPTNeoXForCausalLM":
            edited.gpt_neox.layers[weight.layer].mlp.dense_4h_to_h.weight[weight.row, weight.col] = 0.0
        else:  # Llama, Mistral, OLMo: nn.Linear (d_model, d_mlp)
            edited.model.layers[weight.layer].mlp.down_proj.weight[weight.row, weight.col] = 0.0
    return edited


def largest_weight(loaded: LoadedModel, layer: int) -> SuperWeight:
    w_out = loaded.model.blocks[layer].mlp.W_out.detach()  # (d_mlp, d_model)
    col, row = divmod(int(w_out.abs().argmax()), w_out.shape[1])
    return SuperWeight(layer, row, col)


@pytest.mark.parametrize("case", ALL, indirect=True)
def test_view_computes_the_same_logits_as_the_hooked_model_and_the_checkpoint(
    case: tuple[LoadedModel, Any],
) -> None:
    loaded, original = case
    batch = tokens()
    view = logits(transformers_view(loaded), batch)
    assert torch.allclose(view, logits(loaded.model, batch), atol=1e-4)
    assert torch.allclose(view, logits(original, batch), atol=1e-4)


@pytest.mark.parametrize("case", ALL, indirect=True)
def test_zeroing_a_weight_in_the_hooked_model_changes_the_view_identically(
    case: tuple[LoadedModel, Any],
) -> None:
    loaded, original = case
    view, batch, weight = transformers_view(loaded), tokens(), largest_weight(loaded, layer=1)
    before = logits(view, batch)
    expected = logits(zero_by_hand(original, weight), batch)
    with zeroed(loaded.model, [weight]):
        edited_view, edited_hooked = logits(view, batch), logits(loaded.model, batch)
    assert (expected - before).abs().max() > 1e-4  # the edit matters
    assert torch.allclose(edited_view, expected, atol=1e-5)
    assert torch.allclose(edited_hooked, expected, atol=1e-4)
    # Restored with the HookedTransformer, bit for bit: the same forward on the same batch as `before`.
    assert torch.equal(logits(view, batch), before)


@pytest.mark.parametrize("case", ALL, indirect=True)
def test_view_down_projections_are_the_w_out_storage(case: tuple[LoadedModel, Any]) -> None:
    loaded, _ = case
    view = transformers_view(loaded)
    shared = {p.untyped_storage().data_ptr() for p in view.parameters()}
    for block in loaded.model.blocks:
        assert block.mlp.W_out.untyped_storage().data_ptr() in shared


def test_view_is_built_once_per_loaded_model(hub_models: dict[str, LoadedModel]) -> None:
    loaded = hub_models["gpt2-small"]
    assert transformers_view(loaded) is transformers_view(loaded)


def test_view_of_a_model_missing_from_the_cache_is_not_downloaded(
    hub_models: dict[str, LoadedModel], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_cache(monkeypatch, tmp_path)  # an empty cache
    original = hub_models["gpt2-small"]
    loaded = LoadedModel(original.name, original.model, original.tokenizer, original.source, original.info)
    with pytest.raises(ResourceError, match=r"gpt2 is not in the local Hugging Face cache"):
        transformers_view(loaded)


def test_view_that_computes_other_logits_is_refused(hub_models: dict[str, LoadedModel]) -> None:
    original = hub_models["EleutherAI/pythia-14m"]
    model = copy.deepcopy(original.model)
    with torch.no_grad():
        model.unembed.W_U[:, 5] += 1.0  # not shared with the view, so the two now disagree
    loaded = LoadedModel(original.name, model, original.tokenizer, original.source, original.info)
    with pytest.raises(ResourceError, match=r"does not compute the same logits") as error:
        transformers_view(loaded)
    found = re.search(r"differ by up to ([\d.e+-]+) \(allowed: ([\d.e+-]+)", str(error.value))
    assert found is not None and float(found[1]) > 1 > 100 * float(found[2])


def test_view_of_other_weights_than_the_checkpoint_is_refused(hub_models: dict[str, LoadedModel]) -> None:
    original = hub_models["mistralai/Mistral-7B-v0.1"]
    model = copy.deepcopy(original.model)
    with torch.no_grad():
        model.blocks[1].mlp.W_out[3, 4] = 7.0
    loaded = LoadedModel(original.name, model, original.tokenizer, original.source, original.info)
    with pytest.raises(
        ResourceError, match=r"layer 1's MLP down projection: .*model\.layers\.1\.mlp\.down_proj"
    ):
        transformers_view(loaded)


def test_model_without_checkpoint_and_not_llama_has_no_view(tiny_model: LoadedModel) -> None:
    with pytest.raises(ResourceError, match=r"'tiny' .*only Llama-architecture models"):
        transformers_view(tiny_model)


def test_checkpoint_dir_whose_path_says_llama_gets_a_clear_error(
    hub: dict[str, Any], tiny_tokenizer: Any, tmp_path: Path
) -> None:
    """TransformerLens reads a path containing 'llama' as a Llama; another architecture there must
    fail with a message, not a traceback."""
    directory = tmp_path / "my-llama-finetune"
    hub["mistralai/Mistral-7B-v0.1"].save_pretrained(directory)
    tiny_tokenizer.save_pretrained(directory)
    with pytest.raises(ResourceError, match=r"its path contains 'llama', but it is MistralForCausalLM"):
        load_model(str(directory), device="cpu")
