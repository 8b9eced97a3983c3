"""``load_model``: a spec's model name → a :class:`~runner.models.loaded.LoadedModel`, by kind.

Every model keeps its raw weights: no layer-norm folding and no centering. Analyses edit MLP
weights and read them back, which needs the weights the checkpoint has, not a folded equivalent.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from runner.errors import ResourceError
from runner.models.gguf import load_embedded, load_gguf_file
from runner.models.hub import load_from_hub
from runner.models.imports import import_heavy
from runner.models.llama import hooked_llama_from_hf, load_raw_weights
from runner.models.loaded import Loaded, LoadedModel, model_facts, resolve_device, resolve_dtype
from runner.models.naming import EMBEDDED_MODEL, describe_model
from runner.models.naming import package_version as version
from runner.models.weight_cache import default_cache_dir

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


def load_model(
    name: str, *, device: str = "cpu", dtype: str = "float32", cache_dir: Path | None = None
) -> LoadedModel:
    """Load the model ``name`` (see :func:`describe_model`) as a ``HookedTransformer``.

    The model is in eval mode on ``device`` (``auto``, ``cpu``, ``cuda``) in ``dtype``, with raw
    weights. GGUF conversions are cached under ``cache_dir`` (default :func:`default_cache_dir`).
    Raises :class:`ResourceError` for every foreseeable problem.
    """
    described = describe_model(name)
    kind, location = described["kind"], described["location"]
    device, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    cache_dir = cache_dir or default_cache_dir()
    import_seconds = _import_model_libraries()
    started = time.perf_counter()
    loaded = _LOADERS[kind](name, location, device, torch_dtype, cache_dir)
    loaded.model.eval()
    info = {
        "kind": kind,
        "location": location,
        **loaded.info,
        **model_facts(loaded.model),
        "device": device,
        "dtype": dtype,
        "load_seconds": round(time.perf_counter() - started, 2),
        "import_seconds": round(import_seconds, 2),
        "versions": {p: version(p) for p in ("torch", "transformers", "transformer-lens")},
    }
    return LoadedModel(name, loaded.model, loaded.tokenizer, loaded.source, info)


def _import_model_libraries() -> float:
    """Import TransformerLens (and with it transformers): seconds in a fresh process, nothing later.

    Timed apart so that ``load_seconds`` measures loading the model, not importing libraries; the
    garbage collector is paused meanwhile (see :mod:`runner.models.imports`).
    """
    return import_heavy("transformer_lens")[1]


def _load_local_dir(name: str, location: str, device: str, dtype: torch.dtype, cache_dir: Path) -> Loaded:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = Path(location)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        hf_model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, local_files_only=True)
    except (ValueError, OSError, KeyError) as exc:
        raise ResourceError(
            f"Cannot load model from {directory}: transformers {version('transformers')} could not read "
            f"the checkpoint ({exc}).\nThe directory needs config.json, the weights and the tokenizer "
            "files, as written by `model.save_pretrained(dir)` and `tokenizer.save_pretrained(dir)`."
        ) from exc
    architecture = (hf_model.config.architectures or [type(hf_model).__name__])[0]
    if hf_model.config.model_type == "llama":
        model = hooked_llama_from_hf(
            hf_model, tokenizer, device=device, dtype=dtype, model_name=directory.name
        )
    else:
        model = _hooked_via_transformer_lens(directory, hf_model, tokenizer, architecture, device, dtype)
    return Loaded(model, tokenizer, f"local checkpoint {directory} ({architecture})", {"from_cache": False})


def _hooked_via_transformer_lens(
    directory: Path, hf_model: Any, tokenizer: Any, architecture: str, device: str, dtype: torch.dtype
) -> HookedTransformer:
    """Non-Llama checkpoints: TransformerLens' own config and weight conversion for the architecture."""
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading

    try:
        cfg = loading.get_pretrained_model_config(
            str(directory), hf_cfg=hf_model.config.to_dict(), fold_ln=False, device=device, dtype=dtype
        )
        state_dict = loading.get_pretrained_state_dict(str(directory), cfg, hf_model, dtype=dtype)
    except NotImplementedError as exc:
        raise ResourceError(
            f"Cannot load model from {directory}: TransformerLens {version('transformer-lens')} does not "
            f"support the architecture {architecture} ({exc}).\n"
            "Use a model of an architecture TransformerLens supports (GPT-2, Llama, Qwen2, Gemma, ...), "
            f"or `{EMBEDDED_MODEL}`."
        ) from exc
    except AttributeError as exc:
        # TransformerLens picks Llama or Gemma settings from the path alone when it contains those
        # words, and then fails on another architecture's config.
        named = [word for word in ("llama", "gemma") if word in str(directory).lower()]
        if not named:
            raise
        raise ResourceError(
            f"Cannot load model from {directory}: TransformerLens {version('transformer-lens')} read it as "
            f"a {named[0].capitalize()} model because its path contains '{named[0]}', but it is "
            f"{architecture} ({type(exc).__name__}: {exc}).\n"
            f"Move or link the checkpoint to a path without '{named[0]}' and use that path."
        ) from exc
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=True)
    load_raw_weights(model, state_dict)
    return model


_LOADERS: dict[str, Callable[[str, str, str, torch.dtype, Path], Loaded]] = {
    "embedded": load_embedded,
    "gguf-file": load_gguf_file,
    "local-dir": _load_local_dir,
    "transformer-lens": load_from_hub,
    "hf-hub": load_from_hub,
}
