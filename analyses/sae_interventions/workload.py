"""What ``sae_interventions`` runs: the (layer, feature, alpha) interventions and the edit itself.

Both methods (``loop.py``, ``fast.py``) read the same :class:`Workload` and apply the same edit,
:func:`feature_delta`: the feature's activation changes, the SAE's reconstruction error stays.
``select.py`` builds the workload from the params.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from analyses._lean_forward import LeanForward
from analyses._sae_tensors import Unembedding, eligible_positions
from analyses.sae_interventions import Mode
from runner.saes.loading import LoadedSAE

__all__ = ["Intervention", "Workload", "feature_delta"]


@dataclass(frozen=True)
class Intervention:
    """One (layer, feature, alpha): one row of ``per_feature_metrics.csv``."""

    index: int
    """Position in :attr:`Workload.interventions` (and in the accumulators)."""
    layer: int
    """Index into :attr:`Workload.saes`."""
    slot: int
    """Index of the feature among its layer's selected features."""
    feature: int
    alpha: float


@dataclass
class Workload:
    """Everything the two methods share: SAEs, features, alphas, mode and the positions SAEs see."""

    saes: list[LoadedSAE]
    features: list[list[int]]
    """Per SAE, the selected features."""
    labels: list[list[str]]
    alphas: tuple[float, ...]
    mode: Mode
    exclude_bos: bool
    bos_id: int | None
    unembedding: Unembedding
    lean: LeanForward | None = None
    """Fast path: the lean block forward the rows run through (``None``: TransformerLens' blocks)."""
    interventions: list[Intervention] = field(init=False)

    def __post_init__(self) -> None:
        self.interventions = [
            Intervention(0, layer, slot, feature, alpha)
            for layer, features in enumerate(self.features)
            for slot, feature in enumerate(features)
            for alpha in self.alphas
        ]
        self.interventions = [
            Intervention(i, iv.layer, iv.slot, iv.feature, iv.alpha)
            for i, iv in enumerate(self.interventions)
        ]

    def is_identity(self, iv: Intervention) -> bool:
        """``scale`` by 1 changes nothing: the intervened model is the clean one."""
        return self.mode == "scale" and iv.alpha == 1.0

    def edited(self, f: torch.Tensor, alpha: float) -> torch.Tensor:
        """The feature's new activation given its clean activation ``f``."""
        if self.mode == "scale":
            return f * alpha
        if self.mode == "ablate":
            return torch.zeros_like(f)
        return torch.full_like(f, alpha)

    def eligible(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` positions an SAE reads and may edit."""
        return eligible_positions(tokens, self.bos_id, self.exclude_bos)


def feature_delta(
    loaded: LoadedSAE, x: torch.Tensor, f: torch.Tensor, new: torch.Tensor, features: torch.Tensor
) -> torch.Tensor:
    """``(R, P, d)`` change of the activation ``x`` ``(R, P, d)`` when feature ``features[r]`` goes from
    ``f`` to ``new`` (both ``(R, P)``); the reconstruction error is untouched."""
    direction = loaded.sae.W_dec[features].to(x.dtype)  # (R, d)
    change = (new - f).to(x.dtype).unsqueeze(-1)  # (R, P, 1)
    return change * loaded.decoder_scale(x) * direction.unsqueeze(1)
