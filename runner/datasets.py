"""Text datasets, tokenized deterministically into equal-length passages.

Passages are cut from one token stream so that every passage has exactly ``max_len`` tokens and no
padding is ever needed (padded batches are a known source of silent errors in hooked models).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from runner.errors import ResourceError

__all__ = ["TokenDataset", "fingerprint_tokens", "load_text", "tokenize_passages"]

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


def fingerprint_tokens(tokens: torch.Tensor) -> str:
    """A short content hash of a token tensor (shape and values)."""
    digest = hashlib.sha256(str(tuple(tokens.shape)).encode())
    digest.update(tokens.numpy().astype("<i8").tobytes())
    return digest.hexdigest()[:16]
