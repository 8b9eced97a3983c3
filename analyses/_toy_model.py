"""The toy residual-MLP model of SPD's ``resid_mlp`` experiment, its data, and its checkpoint format.

After Braun et al. 2025 ("Interpretability in Parameter Space", APD) and Bushnaq, Braun, Sharkey 2025
("Stochastic Parameter Decomposition"): ``n_features`` sparse input features are embedded into a
residual stream by a fixed random matrix ``W_E`` (unit-norm rows, not trained) and read off by
``W_U = W_E^T``; each of ``n_layers`` blocks adds ``mlp_out(relu(mlp_in(residual)))``. Trained to
output ``relu(c_i * x_i) + x_i`` for every feature, the MLPs must compute ``n_features`` ReLUs with
fewer neurons, in superposition: the known answer SPD should find is one ``mlp_in`` component per
feature.

A checkpoint is a folder holding ``resid_mlp.safetensors`` (the weights by parameter name, the label
coefficients under ``label_coeffs``) and ``resid_mlp_config.json`` (:class:`ToyConfig`); never a pickle.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "ResidMLP",
    "ToyConfig",
    "dedupe_empty",
    "load_toy_checkpoint",
    "module_names",
    "small_work_threads",
    "sparse_features",
    "toy_from_arrays",
    "toy_labels",
    "toy_tensors",
]

WEIGHTS_FILE = "resid_mlp.safetensors"
CONFIG_FILE = "resid_mlp_config.json"


@dataclass(frozen=True)
class ToyConfig:
    """Sizes of a toy residual MLP and how its labels and data are made."""

    n_features: int
    d_embed: int
    d_mlp: int
    n_layers: int
    in_bias: bool = False
    out_bias: bool = False
    feature_probability: float = 0.01
    """Probability that a feature is active (uniform in (-1, 1)) in a sample; SPD's data uses the same."""

    def to_json(self) -> dict[str, Any]:
        """The config as a JSON object (the checkpoint's ``resid_mlp_config.json``)."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ToyConfig:
        """Inverse of :meth:`to_json`; unknown keys are an error, not silently dropped."""
        return cls(**data)


def module_names(n_layers: int) -> list[str]:
    """The decomposable weights, in forward order: ``layers.0.mlp_in``, ``layers.0.mlp_out``, ..."""
    return [f"layers.{i}.{part}" for i in range(n_layers) for part in ("mlp_in", "mlp_out")]


class MLP(nn.Module):
    """``mlp_out(relu(mlp_in(x)))``, the two weights named as SPD's target patterns expect."""

    def __init__(self, d_embed: int, d_mlp: int, in_bias: bool, out_bias: bool) -> None:
        super().__init__()
        self.mlp_in = nn.Linear(d_embed, d_mlp, bias=in_bias)
        self.mlp_out = nn.Linear(d_mlp, d_embed, bias=out_bias)


Replace = dict[str, Any]
"""Module name → function of the module's input that replaces the module's output."""


class ResidMLP(nn.Module):
    """The toy model. ``forward`` can replace any weight's output and record every weight's input."""

    label_coeffs: Tensor
    """``(n_features,)`` coefficients c of the labels ``relu(c x) + x`` (a buffer, saved with the weights)."""

    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        self.config = config
        self.W_E = nn.Parameter(torch.empty(config.n_features, config.d_embed))
        self.W_U = nn.Parameter(torch.empty(config.d_embed, config.n_features))
        self.layers: list[MLP] = nn.ModuleList(  # type: ignore[assignment]
            MLP(config.d_embed, config.d_mlp, config.in_bias, config.out_bias) for _ in range(config.n_layers)
        )
        self.register_buffer("label_coeffs", torch.ones(config.n_features))

    def forward(
        self,
        x: Tensor,
        *,
        replace: Replace | None = None,
        inputs: dict[str, Tensor] | None = None,
        hidden: dict[int, Tensor] | None = None,
        pre_activation: bool = False,
    ) -> Tensor:
        """``(..., n_features)`` → ``(..., n_features)``.

        ``replace[name](x)`` stands in for weight ``name``; ``inputs`` receives each weight's input
        and ``hidden`` each layer's neurons (after the ReLU, or before with ``pre_activation``).
        """
        return self.forward_from(
            0, x @ self.W_E, replace=replace, inputs=inputs, hidden=hidden, pre_activation=pre_activation
        )

    def forward_from(
        self,
        start: int,
        residual: Tensor,
        *,
        replace: Replace | None = None,
        inputs: dict[str, Tensor] | None = None,
        hidden: dict[int, Tensor] | None = None,
        pre_activation: bool = False,
    ) -> Tensor:
        """:meth:`forward` from the ``(..., d_embed)`` residual stream entering layer ``start``."""
        for i, layer in enumerate(self.layers):
            if i < start:
                continue
            pre = self._through(f"layers.{i}.mlp_in", layer.mlp_in, residual, replace, inputs)  # (..., d_mlp)
            post = torch.relu(pre)
            if hidden is not None:
                hidden[i] = pre if pre_activation else post
            residual = residual + self._through(f"layers.{i}.mlp_out", layer.mlp_out, post, replace, inputs)
        return residual @ self.W_U  # (..., n_features)

    @staticmethod
    def _through(
        name: str, linear: nn.Linear, x: Tensor, replace: Replace | None, inputs: dict[str, Tensor] | None
    ) -> Tensor:
        if inputs is not None:
            inputs[name] = x
        if replace is not None and name in replace:
            return replace[name](x)
        return linear(x)

    def weight(self, name: str) -> Tensor:
        """The ``(d_out, d_in)`` weight of module ``name`` (``layers.0.mlp_in``)."""
        return self.get_submodule(name).weight  # type: ignore[return-value]

    def bias(self, name: str) -> Tensor | None:
        """The bias of module ``name``, or None."""
        return self.get_submodule(name).bias  # type: ignore[return-value]


def init_embedding(model: ResidMLP, generator: torch.Generator) -> None:
    """SPD's fixed random embedding: ``W_E`` rows drawn Gaussian and normalised, ``W_U = W_E^T``; frozen."""
    with torch.no_grad():
        embed = torch.randn(model.W_E.shape, generator=generator)
        model.W_E.copy_(embed / embed.norm(dim=-1, keepdim=True))
        model.W_U.copy_(model.W_E.T)
    model.W_E.requires_grad_(False)
    model.W_U.requires_grad_(False)


def sparse_features(
    batch: int, n_features: int, probability: float, generator: torch.Generator | None = None
) -> Tensor:
    """``(batch, n_features)``: each feature independently active with ``probability``, then U(-1, 1)."""
    active = torch.rand(batch, n_features, generator=generator) < probability
    values = torch.rand(batch, n_features, generator=generator) * 2 - 1
    return values * active


def dedupe_empty(x: Tensor) -> tuple[Tensor, Tensor]:
    """The rows of ``x`` with an active feature, then one all-zero row if any (``(R, n)``), and weights.

    At SPD's feature probability most samples have no active feature; they all give the same
    activations everywhere, so losses compute them once, weighted by how many there are.
    """
    empty = x.abs().sum(-1) == 0  # (B,)
    n_empty = int(empty.sum())
    rows, weights = x[~empty], torch.ones(int((~empty).sum()))
    if n_empty:
        rows = torch.cat([rows, x.new_zeros(1, x.shape[1])])
        weights = torch.cat([weights, torch.tensor([float(n_empty)])])
    return rows, weights


def toy_labels(x: Tensor, coeffs: Tensor) -> Tensor:
    """SPD's ``act_plus_resid`` labels: ``relu(c * x) + x`` per feature."""
    return torch.relu(x * coeffs) + x


def toy_tensors(model: ResidMLP) -> dict[str, Tensor]:
    """Every tensor of the model by name (weights and ``label_coeffs``), detached, on the CPU."""
    return {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}


def toy_from_arrays(config: ToyConfig, arrays: dict[str, Any]) -> ResidMLP:
    """A :class:`ResidMLP` from :func:`toy_tensors`' names (numpy arrays or tensors), frozen, in eval mode."""
    model = ResidMLP(config)
    tensors = {name: torch.as_tensor(np.asarray(value)) for name, value in arrays.items()}
    model.load_state_dict(tensors, strict=True)
    model.requires_grad_(False)
    return model.eval()


def load_toy_checkpoint(folder: Path) -> ResidMLP:
    """The model saved in ``folder`` (``resid_mlp.safetensors`` + ``resid_mlp_config.json``)."""
    from safetensors.torch import load_file

    config = ToyConfig.from_json(json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8")))
    return toy_from_arrays(config, dict(load_file(str(folder / WEIGHTS_FILE))))


SMALL_WORK = 4_000_000
"""Below this many elements per step (samples x d_embed), one thread is faster than several: the
toy models' tensors are too small to split, and on a busy machine threads spin waiting for each other
(a 300-step test model took 28 s on two threads of a loaded 2-core machine, 1.5 s on one)."""


@contextmanager
def small_work_threads(elements: int) -> Iterator[None]:
    """Run torch on one thread while the work per step is below :data:`SMALL_WORK` elements."""
    before = torch.get_num_threads()
    if elements < SMALL_WORK:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
