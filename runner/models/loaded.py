"""A loaded model (:class:`LoadedModel`) and the settings every loader shares: device, dtype, hooks."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import torch

from runner.errors import ResourceError
from runner.registry import close_matches

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "DTYPES",
    "Loaded",
    "LoadedModel",
    "model_facts",
    "require_hooks",
    "resolve_device",
    "resolve_dtype",
]

T = TypeVar("T")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    """A model ready for analyses: a ``HookedTransformer`` in eval mode plus where it came from."""

    name: str
    """The name as written in the spec, e.g. ``smollm2-135m``."""
    model: HookedTransformer
    """In eval mode, on the requested device and dtype, with raw (unfolded, uncentered) weights."""
    tokenizer: PreTrainedTokenizerBase
    """The checkpoint's own tokenizer. ``model.to_tokens`` prepends BOS per
    ``model.cfg.default_prepend_bos``, which for local models is whether this tokenizer adds BOS
    itself, so both turn text into the same tokens."""
    source: str
    """Human-readable origin, e.g. ``embedded GGUF /path/x.gguf (via weight cache /root/...)``."""
    info: dict[str, Any]
    """JSON-able facts for the run manifest (kind, location, sha256, sizes, device, versions...)."""
    _derived: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def n_layers(self) -> int:
        """Number of transformer blocks."""
        return int(self.model.cfg.n_layers)

    def hook_names(self) -> list[str]:
        """Every hook point of the model, sorted."""
        return sorted(self.model.hook_dict)

    def derived(self, key: str, build: Callable[[], T]) -> T:
        """``build()`` once for this model, then the same object: for things made from the model
        (e.g. a transformers view of it) that live and die with it."""
        if key not in self._derived:
            self._derived[key] = build()
        return self._derived[key]


class Loaded(NamedTuple):
    """What a loader for one kind of model returns to :func:`load_model`."""

    model: HookedTransformer
    tokenizer: PreTrainedTokenizerBase
    source: str
    info: dict[str, Any]


def resolve_device(device: str) -> str:
    """The concrete torch device for a spec's ``device``: ``auto`` picks CUDA when there is one."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if re.fullmatch(r"cuda(:\d+)?", device):
        if not torch.cuda.is_available():
            raise ResourceError(
                f"Cannot use device '{device}': no CUDA GPU is available here "
                f"(torch {torch.__version__}, torch.cuda.is_available() is False).\n"
                "Use `device: auto` (the GPU when there is one, else the CPU) or `device: cpu`."
            )
        return device
    if device == "mps" and torch.backends.mps.is_available():
        return device
    raise ResourceError(
        f"Unknown or unavailable device '{device}'.\nUse `device: auto`, `device: cpu` or `device: cuda`."
    )


def resolve_dtype(dtype: str) -> torch.dtype:
    """The torch dtype for a spec's ``dtype`` (``float32``, ``float16`` or ``bfloat16``)."""
    if dtype not in DTYPES:
        raise ResourceError(f"Unknown dtype '{dtype}'.\nUse one of: {', '.join(DTYPES)}.")
    return DTYPES[dtype]


def require_hooks(loaded: LoadedModel, hook_names: Iterable[str], *, where: str) -> None:
    """Raise :class:`ResourceError` unless the model has every hook in ``hook_names``.

    The message names each missing hook and ``where`` it was needed, and suggests close names.
    """
    existing = loaded.hook_names()
    missing = [hook for hook in dict.fromkeys(hook_names) if hook not in loaded.model.hook_dict]
    if not missing:
        return
    lines = [f"Model '{loaded.name}' has no hook {', '.join(repr(h) for h in missing)}, needed by {where}."]
    for hook in missing:
        close = close_matches(hook, existing, n=5, cutoff=0.5)
        if close:
            lines.append(f"Close to '{hook}': {', '.join(close)}")
    lines.append(
        f"The model has {loaded.n_layers} layers (blocks.0 to blocks.{loaded.n_layers - 1}) and "
        f"{len(existing)} hooks, named like 'blocks.0.hook_resid_post' and 'blocks.0.mlp.hook_post'.\n"
        "Use one of the existing hook names, or a layer index below the number of layers."
    )
    raise ResourceError("\n".join(lines))


def model_facts(model: HookedTransformer) -> dict[str, Any]:
    cfg = model.cfg
    return {
        "architecture": cfg.original_architecture,
        "n_layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "d_mlp": cfg.d_mlp,
        "n_heads": cfg.n_heads,
        "n_key_value_heads": cfg.n_key_value_heads or cfg.n_heads,
        "d_head": cfg.d_head,
        "d_vocab": cfg.d_vocab,
        "n_ctx": cfg.n_ctx,
        "default_prepend_bos": cfg.default_prepend_bos,
    }
