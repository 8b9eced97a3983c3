"""Text datasets, tokenized deterministically into equal-length passages.

Passages are cut from one token stream so that every passage has exactly ``max_len`` tokens and no
padding is ever needed (padded batches are a known source of silent errors in hooked models).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from runner.errors import ResourceError

__all__ = [
    "TokenDataset",
    "cached_tokenize",
    "fingerprint_tokens",
    "load_text",
    "tokenize_passages",
    "tokenizer_identity",
]

HUB_ALIASES = {"wikitext-2": ("wikitext", "wikitext-2-raw-v1")}
STDLIB_SKIPPED_DIRS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "lib2to3",
        "turtledemo",
        "ensurepip",
        "site-packages",
        "__pycache__",
    }
)
"""Standard-library folders that ``python-stdlib`` leaves out: test suites, GUI demos, bundled packages."""
TOKENS_FORMAT = 1
"""Bumped whenever :func:`tokenize_passages` or the stored layout changes, so stored tokens are not reused."""


@dataclass
class TokenDataset:
    """``tokens`` is ``(n_passages, max_len)`` int64 on the CPU; ``fingerprint`` pins its content."""

    name: str
    tokens: torch.Tensor
    fingerprint: str
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def max_len(self) -> int:
        """Tokens per passage."""
        return int(self.tokens.shape[1])

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Consecutive ``(batch, max_len)`` slices; the last one may be smaller."""
        for start in range(0, len(self), batch_size):
            yield self.tokens[start : start + batch_size]

    def n_batches(self, batch_size: int) -> int:
        """How many batches :meth:`batches` yields."""
        return -(-len(self) // batch_size)


def load_text(
    name: str, *, split: str = "test", text_field: str = "text", base_dir: Path | None = None
) -> str:
    """The raw text of dataset ``name``: ``python-docs``, ``python-stdlib``, a ``.txt``/``.jsonl`` file, or a
    hub dataset."""
    if name == "python-docs":
        return _python_docs_text()
    if name == "python-stdlib":  # ~2M characters: python-docs, then the standard library's docstrings
        return _python_docs_text() + "\n\n" + _stdlib_docstrings_text()
    path = Path(name) if base_dir is None or Path(name).is_absolute() else base_dir / name
    if path.suffix in {".txt", ".md", ".jsonl", ".json"} or path.exists():
        return _file_text(path, text_field)
    return _hub_text(name, split, text_field)


def _python_docs_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def _stdlib_docstrings_text() -> str:
    """Every distinct docstring of 40 characters or more (modules, classes, functions) of the standard
    library's ``.py`` files, in sorted file order: the same text for a given Python version."""
    import ast
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    docstrings: dict[str, None] = {}
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if STDLIB_SKIPPED_DIRS.intersection(relative.parts[:-1]) or relative.name.startswith("test_"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node, clean=True)
                if doc and len(doc) >= 40:
                    docstrings[doc] = None
    return "\n\n".join(docstrings)


def _file_text(path: Path, text_field: str) -> str:
    if not path.is_file():
        raise ResourceError(
            f"Dataset file not found: {path}\n"
            "Give a path relative to the spec file, or use the embedded dataset `python-docs`."
        )
    if path.suffix != ".jsonl":
        return path.read_text(encoding="utf-8", errors="replace")
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            texts.append(str(json.loads(line)[text_field]))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ResourceError(
                f"{path}:{number}: cannot read field {text_field!r} from this JSONL line ({exc}).\n"
                "Each line must be a JSON object; set `dataset.text_field` to the key holding the text."
            ) from None
    return "\n\n".join(texts)


def _hub_text(name: str, split: str, text_field: str) -> str:
    path, config = HUB_ALIASES.get(name, (name, None))
    if ":" in path:
        path, config = path.split(":", 1)
    _require_hub(name)
    try:
        import datasets
    except ImportError:
        raise ResourceError(
            f"Dataset {name!r} comes from the Hugging Face hub, which needs the `datasets` package.\n"
            "Install it with `pip install datasets` (or `pip install -e .[hf]`)."
        ) from None
    rows = datasets.load_dataset(path, config, split=split)
    return "\n\n".join(t for t in rows[text_field] if t and t.strip())


def _require_hub(name: str) -> None:
    from runner.models.hub import hub_reachable

    if _hub_cached(name) or hub_reachable():
        return
    raise ResourceError(
        f"Cannot load dataset {name!r}: it must be downloaded from the Hugging Face hub, "
        "which is not reachable from this machine.\n"
        "Use a dataset that loads offline instead:\n"
        "  dataset: {name: python-docs}         # embedded: Python's documentation topics\n"
        "  dataset: {name: path/to/file.txt}    # a local text file (or .jsonl with text_field)"
    )


def _hub_cached(name: str) -> bool:
    cache = Path(os.environ.get("HF_DATASETS_CACHE", Path.home() / ".cache" / "huggingface" / "datasets"))
    stem = HUB_ALIASES.get(name, (name, None))[0].replace("/", "___")
    return cache.is_dir() and any(cache.glob(f"{stem}*"))


def tokenize_passages(
    text: str, tokenizer: Any, *, max_passages: int, max_len: int, prepend_bos: bool
) -> torch.Tensor:
    """Cut the token stream of ``text`` into ``max_passages`` passages of exactly ``max_len`` tokens.

    With ``prepend_bos`` each passage starts with the tokenizer's BOS token followed by
    ``max_len - 1`` text tokens. Raises when the text is too short for even one passage.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos: int | None = getattr(tokenizer, "bos_token_id", None)
    use_bos = prepend_bos and bos is not None
    body = max_len - 1 if use_bos else max_len
    n = min(max_passages, len(ids) // body)
    if n == 0:
        raise ResourceError(
            f"The dataset has {len(ids)} tokens, fewer than one passage of {max_len}.\n"
            "Lower `dataset.max_len` or use a longer text."
        )
    stream = torch.tensor(ids[: n * body], dtype=torch.long).view(n, body)  # (n, body)
    if bos is not None and use_bos:
        stream = torch.cat([torch.full((n, 1), bos, dtype=torch.long), stream], dim=1)  # (n, max_len)
    return stream


def cached_tokenize(
    text: str,
    tokenizer: Any,
    *,
    max_passages: int,
    max_len: int,
    prepend_bos: bool,
    cache_dir: Path | None,
) -> tuple[torch.Tensor, str]:
    """:func:`tokenize_passages`, read from ``cache_dir/tokens/`` when the same text was cut the same way
    by the same tokenizer before; returns the tokens and where they came from (``cached``, ``tokenized``,
    or ``tokenized`` with the reason a stored entry was not used).

    The entry's name is a hash of the text itself, :func:`tokenizer_identity` and the settings, so a
    changed text, tokenizer or setting is a different entry. An entry is an NPZ (read without
    pickle) holding the tokens and their :func:`fingerprint_tokens`; one that does not read back
    whole is tokenized again and replaced. ``cache_dir=None``, or a tokenizer without a serialisable
    backend, tokenizes every time.
    """
    settings: dict[str, Any] = {"max_passages": max_passages, "max_len": max_len, "prepend_bos": prepend_bos}
    identity = tokenizer_identity(tokenizer)
    if cache_dir is None or identity is None:
        return tokenize_passages(text, tokenizer, **settings), "tokenized"
    key = {"format": TOKENS_FORMAT, "text_sha256": _sha256(text), "tokenizer": identity, **settings}
    path = cache_dir / "tokens" / f"{_sha256(json.dumps(key, sort_keys=True))[:32]}.npz"
    how = "tokenized"
    if path.is_file():
        try:
            return _read_tokens(path, max_passages=max_passages, max_len=max_len), "cached"
        except Exception as exc:  # truncated, not an NPZ, wrong content: tokenize again
            how = f"tokenized (the stored tokens {path.name} did not read back: {type(exc).__name__}: {exc})"
    tokens = tokenize_passages(text, tokenizer, **settings)
    with contextlib.suppress(OSError):  # a read-only or full disk only costs tokenizing next time
        _write_tokens(path, tokens)
    return tokens, how


def tokenizer_identity(tokenizer: Any) -> str | None:
    """sha256 of everything that decides how ``tokenizer`` cuts text, or ``None`` when it cannot be told.

    A fast tokenizer's backend serialises to JSON (normalizer, pre-tokenizer, vocabulary, merges,
    added tokens); with it go the wrapper's class, BOS id and ``split_special_tokens``, and the
    transformers and tokenizers versions (a new version may cut the same text differently).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        return None
    from runner.models.naming import package_version

    wrapper = {
        "class": f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}",
        "bos_token_id": getattr(tokenizer, "bos_token_id", None),
        "split_special_tokens": getattr(tokenizer, "split_special_tokens", None),
        "versions": {p: package_version(p) for p in ("transformers", "tokenizers")},
    }
    return _sha256(backend.to_str() + json.dumps(wrapper, sort_keys=True, default=str))


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()


def _read_tokens(path: Path, *, max_passages: int, max_len: int) -> torch.Tensor:
    """Tokens stored by :func:`_write_tokens`; ValueError unless they are whole and of the right shape."""
    import numpy as np

    with np.load(path, allow_pickle=False) as stored:
        array, fingerprint = stored["tokens"], str(stored["fingerprint"])
    if array.dtype != np.int64 or array.ndim != 2 or array.shape[1] != max_len:
        raise ValueError(f"stored tokens are {array.dtype} {array.shape}, expected int64 (n, {max_len})")
    if not 0 < array.shape[0] <= max_passages:
        raise ValueError(f"{array.shape[0]} stored passages, expected 1 to {max_passages}")
    tokens = torch.from_numpy(array)
    if fingerprint_tokens(tokens) != fingerprint:
        raise ValueError("the stored tokens do not match their fingerprint")
    return tokens


def _write_tokens(path: Path, tokens: torch.Tensor) -> None:
    """Store ``tokens`` atomically: written to a temporary sibling, renamed into place when complete."""
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp.npz")
    try:
        np.savez(tmp, tokens=tokens.numpy(), fingerprint=np.array(fingerprint_tokens(tokens)))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def fingerprint_tokens(tokens: torch.Tensor) -> str:
    """A short content hash of a token tensor (shape and values)."""
    digest = hashlib.sha256(str(tuple(tokens.shape)).encode())
    digest.update(tokens.numpy().astype("<i8").tobytes())
    return digest.hexdigest()[:16]
