"""Hook sites, defined once: the short names params use and TransformerLens' hook names they mean.

``site: resid_post`` at layer 6 is ``blocks.6.hook_resid_post``; ``mlp_post`` is the MLP's hidden
activation (``blocks.6.mlp.hook_post``). TransformerLens passes a block's output unchanged to the
next block, so ``blocks.{L}.hook_resid_post`` and ``blocks.{L+1}.hook_resid_pre`` hold the same
tensor (:func:`equivalent_hooks`). Also here: the one check that requested layers exist.

Imports nothing heavy: params models use :data:`Site`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Literal

from runner.errors import ResourceError

__all__ = [
    "SITE_HOOKS",
    "Site",
    "equivalent_hooks",
    "hook_name",
    "parse_hook",
    "require_layers",
]

Site = Literal["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "mlp_post"]
"""A hook site inside each block, as params name it."""

SITE_HOOKS: dict[str, str] = {
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
    "mlp_post": "mlp.hook_post",
}
"""Site → the hook's name inside ``blocks.{layer}``."""

_HOOK_PATTERN = re.compile(r"^blocks\.(\d+)\.(" + "|".join(re.escape(h) for h in SITE_HOOKS.values()) + r")$")
_SITE_OF_HOOK = {hook: site for site, hook in SITE_HOOKS.items()}


def hook_name(site: str, layer: int) -> str:
    """``hook_name("resid_post", 6)`` → ``"blocks.6.hook_resid_post"``."""
    return f"blocks.{layer}.{SITE_HOOKS[site]}"


def parse_hook(hook: str) -> tuple[int, str] | None:
    """``"blocks.6.hook_resid_post"`` → ``(6, "resid_post")``; None for hooks outside the blocks' sites."""
    match = _HOOK_PATTERN.match(hook)
    return (int(match.group(1)), _SITE_OF_HOOK[match.group(2)]) if match else None


def equivalent_hooks(hook: str, n_layers: int | None = None) -> list[str]:
    """``hook`` and the hooks that TransformerLens guarantees hold the same tensor.

    ``blocks.{L}.hook_resid_post`` is ``blocks.{L+1}.hook_resid_pre`` (when layer L+1 exists).
    """
    parsed = parse_hook(hook)
    if parsed is None:
        return [hook]
    layer, site = parsed
    if site == "resid_post" and (n_layers is None or layer + 1 < n_layers):
        return [hook, hook_name("resid_pre", layer + 1)]
    if site == "resid_pre" and layer > 0:
        return [hook, hook_name("resid_post", layer - 1)]
    return [hook]


def require_layers(
    layers: Iterable[int] | None, n_layers: int, *, model: str, where: str, field: str = "layers"
) -> list[int]:
    """``layers`` as a list (every layer when None), or a :class:`ResourceError` naming the missing ones.

    ``where`` names the requester (``super_weights case detect``), ``field`` the param to fix.
    """
    if layers is None:
        return list(range(n_layers))
    chosen = list(layers)
    missing = sorted({layer for layer in chosen if not 0 <= layer < n_layers})
    if missing:
        which = f"layer {missing[0]} does" if len(missing) == 1 else f"layers {missing} do"
        raise ResourceError(
            f"{where}: {which} not exist in model {model!r}, which has {n_layers} layers "
            f"(0-{n_layers - 1}).\nSet `{field}` within that range."
        )
    return chosen
