"""Tensor helpers shared by analyses: streaming per-dimension accumulators, sign-preserving powers,
normalizations and small statistics. (Hook names are :mod:`runner.hooks`'.)

Inputs that are reduced are torch tensors (activations, gradients); everything returned for
reporting is a NumPy ``float64`` array or plain Python numbers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import torch

__all__ = [
    "DimAccumulator",
    "frozen_parameters",
    "normalize",
    "signed_power",
    "top_by_abs",
    "vector_stats",
]

NormMode = Literal["none", "sum", "sum_abs"]


class DimAccumulator:
    """Streaming per-dimension sum and sum of absolute values over every leading position.

    Each added tensor is summed in its own dtype (float32: a pass over a batch's thousands of
    positions, rounded about as much as a single addition in float32) and the batch totals are
    accumulated in float64, so that means over millions of tokens do not drift. Converting every
    activation to float64 first cost a tenth of the model's own forward.
    """

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.abs_total: torch.Tensor | None = None
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        """Add ``x`` of shape ``(..., D)``: each leading position counts once."""
        flat = x.detach().reshape(-1, x.shape[-1])  # (N, D)
        total = flat.sum(0).double()
        abs_total = flat.abs().sum(0).double()
        if self.total is None or self.abs_total is None:
            self.total, self.abs_total = total, abs_total
        else:
            self.total += total
            self.abs_total += abs_total
        self.count += flat.shape[0]

    def mean(self) -> np.ndarray:
        """Per-dimension mean, ``(D,)`` float64."""
        return self._divide(self.total)

    def mean_abs(self) -> np.ndarray:
        """Per-dimension mean of ``|x|``, ``(D,)`` float64."""
        return self._divide(self.abs_total)

    def _divide(self, total: torch.Tensor | None) -> np.ndarray:
        if total is None or self.count == 0:
            raise ValueError("DimAccumulator is empty: add at least one tensor before reading a mean")
        return total.cpu().numpy() / self.count


def signed_power(x: np.ndarray, power: float) -> np.ndarray:
    """``sign(x) * |x| ** power``: the plain power for non-negative inputs, sign kept otherwise."""
    return np.sign(x) * np.abs(x) ** power


def normalize(x: np.ndarray, mode: NormMode) -> tuple[np.ndarray, bool]:
    """Scale ``x`` so that ``sum(|x|)`` (``sum_abs``) or ``sum(x)`` (``sum``) equals ``len(x)``.

    Returns ``(array, ok)``; ``ok`` is False, and ``x`` is returned unchanged, when the
    denominator is zero or not finite (the caller should tell the user).
    """
    if mode == "none":
        return x, True
    denominator = float(np.abs(x).sum() if mode == "sum_abs" else x.sum())
    if denominator == 0.0 or not np.isfinite(denominator):
        return x, False
    return x * (x.size / denominator), True


def top_by_abs(x: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The ``k`` entries of largest ``|x|`` as ``(index, value)``, largest first (ties: lower index)."""
    order = np.argsort(-np.abs(x), kind="stable")[:k]
    return [(int(i), float(x[i])) for i in order]


def vector_stats(x: np.ndarray) -> dict[str, Any]:
    """``mean``, ``std``, ``max``, ``min``, ``sum_abs`` and ``argmax`` of a 1-D array, as Python numbers."""
    return {
        "mean": float(x.mean()),
        "std": float(x.std()),
        "max": float(x.max()),
        "min": float(x.min()),
        "sum_abs": float(np.abs(x).sum()),
        "argmax": int(x.argmax()),
    }


@contextmanager
def frozen_parameters(module: torch.nn.Module) -> Iterator[None]:
    """Turn off ``requires_grad`` on every parameter for the block, then restore each flag.

    Gradients with respect to activations then cost no parameter-gradient work or memory.
    """
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
