"""Datasets: deterministic passages of exactly max_len tokens, clear errors for bad sources."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from runner import datasets, models
from runner.datasets import (
    cached_tokenize,
    fingerprint_tokens,
    load_text,
    tokenize_passages,
    tokenizer_identity,
)
from runner.errors import ResourceError


def test_python_docs_is_real_text_and_deterministic():
    text = load_text("python-docs")
    assert len(text) > 400_000
    assert text.startswith('The "assert" statement')
    assert text == load_text("python-docs")


def test_passages_have_exact_length_and_start_with_bos(tiny_tokenizer):
    tokens = tokenize_passages(
        load_text("python-docs"), tiny_tokenizer, max_passages=5, max_len=32, prepend_bos=True
    )
    assert tokens.shape == (5, 32) and tokens.dtype == torch.long
    assert (tokens[:, 0] == tiny_tokenizer.bos_token_id).all()
    stream = tiny_tokenizer(load_text("python-docs"), add_special_tokens=False)["input_ids"]
    assert tokens[1, 1:].tolist() == stream[31:62]  # consecutive, unpadded cuts of one token stream


def test_without_bos_passages_are_plain_cuts(tiny_tokenizer):
    tokens = tokenize_passages("abc " * 200, tiny_tokenizer, max_passages=3, max_len=8, prepend_bos=False)
    stream = tiny_tokenizer("abc " * 200, add_special_tokens=False)["input_ids"]
    assert tokens.flatten().tolist() == stream[:24]


def test_short_text_gives_fewer_passages_and_too_short_is_an_error(tiny_tokenizer):
    tokens = tokenize_passages(
        "hello world " * 10, tiny_tokenizer, max_passages=1000, max_len=8, prepend_bos=False
    )
    assert 0 < tokens.shape[0] < 1000
    with pytest.raises(ResourceError, match="fewer than one passage of 4096"):
        tokenize_passages("hi", tiny_tokenizer, max_passages=1, max_len=4096, prepend_bos=False)


def test_fingerprint_changes_with_content_and_shape():
    a = torch.arange(12).view(3, 4)
    assert fingerprint_tokens(a) == fingerprint_tokens(a.clone())
    assert fingerprint_tokens(a) != fingerprint_tokens(a.view(4, 3))
    assert fingerprint_tokens(a) != fingerprint_tokens(a + 1)


def test_local_jsonl_is_read_relative_to_the_spec(tmp_path):
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps({"body": t}) for t in ["one", "two"]) + "\n")
    assert load_text("rows.jsonl", text_field="body", base_dir=tmp_path) == "one\n\ntwo"


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ResourceError, match=r"rows.jsonl:2: cannot read field 'text'"):
        load_text("rows.jsonl", base_dir=tmp_path)


def test_missing_file_suggests_embedded_dataset(tmp_path):
    with pytest.raises(ResourceError, match="python-docs"):
        load_text("nope.txt", base_dir=tmp_path)


def test_hub_dataset_fails_fast_offline_naming_alternatives(monkeypatch):
    monkeypatch.setattr(models, "hub_reachable", lambda *a, **k: False)
    monkeypatch.setattr(datasets, "_hub_cached", lambda name: False)
    with pytest.raises(ResourceError) as info:
        load_text("wikitext-2")
    message = str(info.value)
    assert "Cannot load dataset 'wikitext-2'" in message and "dataset: {name: python-docs}" in message


def test_python_stdlib_adds_the_standard_library_docstrings():
    docs, stdlib = load_text("python-docs"), load_text("python-stdlib")
    assert stdlib.startswith(docs)
    assert len(stdlib) > 3 * len(docs)
    assert "Return" in stdlib[len(docs) :]
    assert stdlib == load_text("python-stdlib")


# --- Tokenized datasets kept on disk ------------------------------------------------------------------

DOCS_SETTINGS: dict[str, Any] = {"max_passages": 6, "max_len": 32, "prepend_bos": True}


def _docs() -> str:
    return load_text("python-docs")[:20_000]  # enough for 6 passages; tokenizing all of it takes seconds


def _tokenize_cached(text, tokenizer, cache_dir, **changes):
    return cached_tokenize(text, tokenizer, **{**DOCS_SETTINGS, **changes}, cache_dir=cache_dir)


def test_tokenized_dataset_is_stored_then_read_back_without_tokenizing(tiny_tokenizer, tmp_path, monkeypatch):
    text = _docs()
    first, how = _tokenize_cached(text, tiny_tokenizer, tmp_path)
    assert how == "tokenized" and len(list((tmp_path / "tokens").glob("*.npz"))) == 1
    assert torch.equal(first, tokenize_passages(text, tiny_tokenizer, **DOCS_SETTINGS))

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized although the tokens were stored")

    monkeypatch.setattr(datasets, "tokenize_passages", no_tokenizing)
    second, how = _tokenize_cached(text, tiny_tokenizer, tmp_path)
    assert how == "cached"
    assert torch.equal(second, first) and second.dtype == torch.long


@pytest.mark.parametrize(
    "change",
    ["text", "tokenizer", "max_len", "max_passages", "prepend_bos"],
)
def test_a_changed_text_tokenizer_or_setting_is_tokenized_anew(
    change, tiny_tokenizer, tiny_tokenizer_dir, tmp_path
):
    from transformers import AutoTokenizer

    text, tokenizer, settings = _docs(), tiny_tokenizer, dict(DOCS_SETTINGS)
    _tokenize_cached(text, tokenizer, tmp_path)
    if change == "text":
        text = text.replace("assert", "insist")
    elif change == "tokenizer":
        tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
        tokenizer.add_tokens([" statement"])  # one more token: the same text cuts differently
    else:
        settings[change] = {"max_len": 16, "max_passages": 4, "prepend_bos": False}[change]
    tokens, how = cached_tokenize(text, tokenizer, **settings, cache_dir=tmp_path)
    assert how == "tokenized"
    assert torch.equal(tokens, tokenize_passages(text, tokenizer, **settings))
    assert len(list((tmp_path / "tokens").glob("*.npz"))) == 2


@pytest.mark.parametrize("damage", ["truncated", "not an npz", "tokens changed", "wrong shape"])
def test_damaged_stored_tokens_are_tokenized_again_and_replaced(damage, tiny_tokenizer, tmp_path):
    import numpy as np

    text = _docs()
    expected, _ = _tokenize_cached(text, tiny_tokenizer, tmp_path)
    (path,) = (tmp_path / "tokens").glob("*.npz")
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-40])
    elif damage == "not an npz":
        path.write_text("garbage")
    else:
        with np.load(path) as stored:
            tokens, fingerprint = stored["tokens"].copy(), stored["fingerprint"]
        tokens = (
            tokens[:, :16]
            if damage == "wrong shape"
            else tokens + (np.arange(tokens.size) == 7).reshape(tokens.shape)
        )
        np.savez(path, tokens=tokens, fingerprint=fingerprint)
    tokens, how = _tokenize_cached(text, tiny_tokenizer, tmp_path)
    assert how.startswith(f"tokenized (the stored tokens {path.name} did not read back")
    assert torch.equal(tokens, expected)
    assert _tokenize_cached(text, tiny_tokenizer, tmp_path)[1] == "cached"  # replaced by a good entry


def test_an_interrupted_store_leaves_no_entry(tiny_tokenizer, tmp_path, monkeypatch):
    import numpy as np

    def interrupted(path, **arrays):
        Path(path).write_bytes(b"PK partial")
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(np, "savez", interrupted)
        with pytest.raises(KeyboardInterrupt):
            _tokenize_cached(_docs(), tiny_tokenizer, tmp_path)
    assert list((tmp_path / "tokens").iterdir()) == []  # neither an entry nor its temporary file


def test_tokenizer_identity_follows_its_vocabulary_and_settings(tiny_tokenizer, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    same = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert tokenizer_identity(same) == tokenizer_identity(tiny_tokenizer) is not None
    same.add_tokens(["<|extra|>"], special_tokens=True)
    assert tokenizer_identity(same) != tokenizer_identity(tiny_tokenizer)


def test_a_tokenizer_without_a_serialisable_backend_is_never_stored(tiny_tokenizer, tmp_path):
    class PlainTokenizer:  # e.g. a slow (pure Python) tokenizer: nothing identifies its rules
        bos_token_id = tiny_tokenizer.bos_token_id

        def __call__(self, text, add_special_tokens=False):
            return tiny_tokenizer(text, add_special_tokens=add_special_tokens)

    text = _docs()
    for _ in range(2):
        tokens, how = _tokenize_cached(text, PlainTokenizer(), tmp_path)
        assert how == "tokenized"
    assert torch.equal(tokens, tokenize_passages(text, tiny_tokenizer, **DOCS_SETTINGS))
    assert not (tmp_path / "tokens").exists()


def test_the_next_run_reads_its_dataset_from_the_stored_tokens(tiny_gguf, tmp_path):
    from runner.resources import Resources
    from runner.spec import DatasetSpec, ModelSpec

    (tmp_path / "docs.txt").write_text(_docs())
    model = ModelSpec(name=str(tiny_gguf), device="cpu")
    dataset = DatasetSpec(name="docs.txt", max_passages=4, max_len=16)
    first = Resources(base_dir=tmp_path, cache_dir=tmp_path / "cache").dataset(dataset, model)
    second = Resources(base_dir=tmp_path, cache_dir=tmp_path / "cache").dataset(dataset, model)
    assert (first.info["tokens"], second.info["tokens"]) == ("tokenized", "cached")
    assert torch.equal(second.tokens, first.tokens) and second.fingerprint == first.fingerprint
