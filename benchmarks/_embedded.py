"""The embedded workload the SAE benchmarks share: SmolLM2-135M and python-docs passages of 128 tokens."""

from __future__ import annotations

from typing import Any


def load_embedded(passages: int, max_len: int = 128) -> tuple[Any, Any]:
    """The embedded model (``runner.models.load_model``) and ``passages`` python-docs passages as a run
    gives them to a case (BOS prepended)."""
    from runner.datasets import TokenDataset, fingerprint_tokens, load_text, tokenize_passages
    from runner.models import load_model

    model = load_model("smollm2-135m")
    text = load_text("python-docs")
    tokens = tokenize_passages(
        text, model.tokenizer, max_passages=passages, max_len=max_len, prepend_bos=True
    )
    return model, TokenDataset("python-docs", tokens, fingerprint_tokens(tokens))
