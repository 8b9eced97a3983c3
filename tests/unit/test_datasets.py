"""Datasets: deterministic passages of exactly max_len tokens, clear errors for bad sources."""

from __future__ import annotations

import json

import pytest
import torch

from runner import datasets, models
from runner.datasets import fingerprint_tokens, load_text, tokenize_passages
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
