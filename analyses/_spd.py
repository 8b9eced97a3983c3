"""Stochastic Parameter Decomposition of the toy residual MLP (Bushnaq, Braun, Sharkey 2025).

Each target weight ``W`` (``d_out x d_in``: ``layers.*.mlp_in``, ``layers.*.mlp_out``) is written as C
rank-one subcomponents, ``W ≈ (V @ U)^T`` with ``V: d_in x C`` and ``U: C x d_out``. A causal-importance
function per subcomponent (a scalar MLP ``1 -> 16 -> 1`` with GELU on its inner activation ``x @ V[:, c]``)
gives a pre-sigmoid value ``g``; its lower leaky-hard sigmoid ``clamp(g, 0, 1)`` is the causal
importance (CI) used for masks, its upper leaky-hard sigmoid (slope 0.01 above 1) is what importance
minimality penalises.

Training, as in the SPD repository (goodfire-ai/spd: ``run_spd.py``, ``metrics/``, and the defaults
of ``experiments/resid_mlp/resid_mlp1_config.yaml``), minimises over a batch of sparse inputs:

- stochastic reconstruction: every weight replaced by its components masked by
  ``ci + (1 - ci) * r`` with ``r ~ U(0, 1)`` per sample and component, plus the weight delta
  ``W - (V @ U)^T`` masked by one ``U(0, 1)`` number per sample (``use_delta_component``); the MSE
  between that output and the target model's, averaged over elements;
- layerwise stochastic reconstruction: the same with one weight replaced at a time, averaged;
- importance minimality: ``sum_modules sum_c mean_batch (ci_upper + 1e-12) ** p``;
- optionally faithfulness, ``mean((W - (V @ U)^T) ** 2)`` over every weight element.

Components start with a faithfulness warm-up (AdamW on the faithfulness loss alone), then AdamW
(no weight decay) trains components and CI functions together.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from analyses._toy_model import ResidMLP, ToyConfig, dedupe_empty, sparse_features, toy_from_arrays

__all__ = [
    "SPD_CONFIG_FILE",
    "SPD_WEIGHTS_FILE",
    "Decomposition",
    "SpdConfig",
    "SpdTraining",
    "feature_ci",
    "load_spd_checkpoint",
    "lower_leaky",
    "spd_from_arrays",
    "train_spd",
    "upper_leaky",
]

SPD_WEIGHTS_FILE = "spd_model.safetensors"
SPD_CONFIG_FILE = "spd_config.json"
UPPER_LEAK = 0.01
"""Slope of the upper leaky-hard sigmoid above 1 (the repository's ``upper_leaky_hard`` alpha)."""
IMPORTANCE_EPS = 1e-12


def lower_leaky(pre: Tensor) -> Tensor:
    """CI used in masks: ``clamp(pre, 0, 1)`` (the repository's lower leaky-hard sigmoid, alpha 0)."""
    return pre.clamp(0.0, 1.0)


def upper_leaky(pre: Tensor) -> Tensor:
    """CI penalised by importance minimality: ``clamp(pre, 0, 1)``, rising with slope 0.01 above 1."""
    return torch.where(pre > 1, 1 + UPPER_LEAK * (pre - 1), pre.clamp(0.0, 1.0))


@dataclass(frozen=True)
class SpdConfig:
    """The shape of a decomposition: what is decomposed and how its CI functions are built."""

    toy: ToyConfig
    modules: tuple[str, ...]
    C: int
    ci_hidden: tuple[int, ...] = (16,)

    def to_json(self) -> dict[str, Any]:
        """As written to ``spd_config.json``."""
        data = asdict(self)
        data["sigmoid"] = "leaky_hard"
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SpdConfig:
        """Inverse of :meth:`to_json`."""
        return cls(
            toy=ToyConfig.from_json(data["toy"]),
            modules=tuple(data["modules"]),
            C=int(data["C"]),
            ci_hidden=tuple(data["ci_hidden"]),
        )


class GateMLPs(nn.Module):
    """C independent scalar MLPs ``1 -> hidden -> 1`` (GELU between layers), evaluated in parallel."""

    def __init__(self, C: int, hidden: tuple[int, ...], generator: torch.Generator) -> None:
        super().__init__()
        sizes = [1, *hidden, 1]
        self.W = nn.ParameterList()
        self.b = nn.ParameterList()
        for i, (d_in, d_out) in enumerate(itertools.pairwise(sizes)):
            gain = 1.0 if i == len(sizes) - 2 else math.sqrt(2.0)  # Kaiming: ReLU-like into GELU, linear out
            self.W.append(
                nn.Parameter(torch.randn(C, d_in, d_out, generator=generator) * gain / math.sqrt(d_in))
            )
            self.b.append(nn.Parameter(torch.zeros(C, d_out)))

    def forward(self, inner: Tensor) -> Tensor:
        """``(..., C)`` inner activations → ``(..., C)`` pre-sigmoid gate outputs."""
        # The first layer has one input and the last one output per component: broadcasts, not matmuls.
        h = F.gelu(inner.unsqueeze(-1) * self.W[0][:, 0, :] + self.b[0])  # (..., C, hidden[0])
        for w, b in zip(self.W[1:-1], self.b[1:-1], strict=True):
            h = F.gelu(torch.einsum("...ci,cio->...co", h, w) + b)  # (..., C, d_out)
        return (h * self.W[-1][:, :, 0]).sum(-1) + self.b[-1][:, 0]  # (..., C)


def _key(name: str) -> str:
    return name.replace(".", "-")


class Decomposition(nn.Module):
    """A frozen target :class:`ResidMLP`, its rank-one components and their causal-importance functions."""

    def __init__(self, target: ResidMLP, config: SpdConfig, generator: torch.Generator) -> None:
        super().__init__()
        self.target = target
        self.config = config
        self.V = nn.ParameterDict()
        self.U = nn.ParameterDict()
        self.gates = nn.ModuleDict()
        for name in config.modules:
            d_out, d_in = target.weight(name).shape
            # The repository's init: Kaiming-normal with linear gain, fan d_in for V and C for U.
            self.V[_key(name)] = nn.Parameter(
                torch.randn(d_in, config.C, generator=generator) / math.sqrt(d_in)
            )
            self.U[_key(name)] = nn.Parameter(
                torch.randn(config.C, d_out, generator=generator) / math.sqrt(config.C)
            )
            self.gates[_key(name)] = GateMLPs(config.C, config.ci_hidden, generator)

    @property
    def modules_(self) -> tuple[str, ...]:
        """The decomposed weights, in forward order."""
        return self.config.modules

    def inner(self, name: str, x: Tensor) -> Tensor:
        """Inner activations ``x @ V``: ``(..., d_in)`` → ``(..., C)`` (the gates' inputs)."""
        return x @ self.V[_key(name)]

    def pre_sigmoid(self, name: str, x: Tensor) -> Tensor:
        """The gate outputs before the sigmoid for module ``name`` given its input ``x``: ``(..., C)``."""
        return self.gates[_key(name)](self.inner(name, x))

    def component_weight(self, name: str) -> Tensor:
        """``(V @ U)^T``: the summed components as a ``(d_out, d_in)`` weight."""
        return (self.V[_key(name)] @ self.U[_key(name)]).T

    def weight_delta(self, name: str) -> Tensor:
        """``W - (V @ U)^T``: what the components miss of the target weight."""
        return self.target.weight(name) - self.component_weight(name)

    def masked(
        self, name: str, mask: Tensor, delta: tuple[Tensor, Tensor] | None = None
    ) -> Callable[[Tensor], Tensor]:
        """The module's replacement: ``((x @ V) * mask) @ U`` (+ ``delta_mask * x @ delta^T``) + bias.

        ``delta`` is ``(weight delta (d_out, d_in), per-sample mask (...,))`` or None.
        """
        V, U, bias = self.V[_key(name)], self.U[_key(name)], self.target.bias(name)

        def forward(x: Tensor) -> Tensor:
            out = ((x @ V) * mask) @ U  # (..., d_out)
            if delta is not None:
                weight_delta, delta_mask = delta
                out = out + delta_mask.unsqueeze(-1) * (x @ weight_delta.T)
            return out + bias if bias is not None else out

        return forward

    def causal_importance(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Pre-sigmoid gate outputs per module, from each module's input (recorded by the target forward)."""
        return {name: self.pre_sigmoid(name, inputs[name]) for name in self.config.modules}


def faithfulness(model: Decomposition) -> Tensor:
    """Mean squared weight delta over every element of every decomposed weight."""
    deltas = [model.weight_delta(name) for name in model.config.modules]
    return sum(((d**2).sum() for d in deltas), torch.tensor(0.0)) / sum(d.numel() for d in deltas)


@dataclass
class SpdTraining:
    """Hyperparameters of :func:`train_spd` (the decompose_spd params carry the same names)."""

    C: int = 100
    ci_hidden: tuple[int, ...] = (16,)
    steps: int = 20_000
    batch_size: int = 2048
    lr: float = 2e-3
    stochastic_recon_coeff: float = 1.0
    stochastic_recon_layerwise_coeff: float = 1.0
    importance_minimality_coeff: float = 1e-5
    pnorm: float = 2.0
    p_anneal_start_frac: float = 1.0
    """Fraction of training after which p moves linearly towards ``p_anneal_final_p`` (1: never)."""
    p_anneal_final_p: float | None = None
    """The p reached at ``p_anneal_end_frac`` and kept after it (None: no annealing)."""
    p_anneal_end_frac: float = 1.0
    lr_schedule: str = "constant"
    """``constant`` or ``cosine`` (half cosine from ``lr`` to 0), after ``lr_warmup_pct`` linear warm-up."""
    lr_warmup_pct: float = 0.0
    faithfulness_coeff: float = 0.0
    use_delta_component: bool = True
    n_mask_samples: int = 1
    faithfulness_warmup_steps: int = 200
    faithfulness_warmup_lr: float = 0.01
    faithfulness_warmup_weight_decay: float = 0.1
    feature_probability: float | None = None
    """Probability of each feature in the training data; None takes the toy model's."""
    log_every: int = 50


@dataclass
class TrainingLog:
    """Per-step losses (every ``log_every`` steps and the last)."""

    rows: list[dict[str, float]] = field(default_factory=list)
    warmup_faithfulness: float | None = None


def annealed_p(settings: SpdTraining, frac: float) -> float:
    """The importance-minimality p at fraction ``frac`` of training (the repository's linear annealing)."""
    final, start, end = settings.p_anneal_final_p, settings.p_anneal_start_frac, settings.p_anneal_end_frac
    if final is None or start >= 1.0 or frac < start:
        return settings.pnorm
    if frac >= end:
        return final
    return settings.pnorm + (final - settings.pnorm) * (frac - start) / (end - start)


def lr_at(settings: SpdTraining, step: int) -> float:
    """The learning rate at ``step``: linear warm-up over ``lr_warmup_pct``, then constant or half cosine."""
    warmup = int(settings.lr_warmup_pct * settings.steps)
    if step < warmup:
        return settings.lr * (step + 1) / warmup
    if settings.lr_schedule == "cosine":
        frac = (step - warmup) / max(settings.steps - warmup - 1, 1)
        return settings.lr * 0.5 * (1 + math.cos(math.pi * frac))
    return settings.lr


def losses(
    model: Decomposition,
    x: Tensor,
    settings: SpdTraining,
    generator: torch.Generator,
    frac_of_training: float = 1.0,
) -> dict[str, Tensor]:
    """Every loss term on the batch ``x`` (``(B, n_features)``), with fresh stochastic masks.

    ``frac_of_training`` sets the annealed p of importance minimality (:func:`annealed_p`).

    Samples with no active feature (most of them at SPD's feature probability) all have the same
    inputs everywhere, so they are computed once, as one row weighted by their count. Without
    biases (the toy model's default) their reconstruction error is exactly zero whatever the masks,
    and every loss equals the one computed sample by sample.
    """
    rows, weights = dedupe_empty(x)  # (R, n_features), (R,)
    n_samples, n_out = x.shape[0], model.config.toy.n_features
    target = model.target
    inputs: dict[str, Tensor] = {}
    with torch.no_grad():
        target_out = target(rows, inputs=inputs)  # (R, n_features)
    pre = model.causal_importance(inputs)
    ci = {name: lower_leaky(g) for name, g in pre.items()}
    deltas = {name: model.weight_delta(name) for name in ci}

    def mse(out: Tensor) -> Tensor:  # mean over every element of the full batch
        return (weights * ((out - target_out) ** 2).sum(-1)).sum() / (n_samples * n_out)

    recon, layerwise = torch.tensor(0.0), torch.tensor(0.0)
    for _ in range(settings.n_mask_samples):
        replace = {}
        for name, c in ci.items():
            mask = c + (1 - c) * torch.rand(c.shape, generator=generator)  # (R, C)
            delta = (deltas[name], torch.rand(c.shape[0], generator=generator))  # mask (R,)
            replace[name] = model.masked(name, mask, delta if settings.use_delta_component else None)
        # Forwards start from the residual stream entering the first replaced layer (recorded above).
        recon = recon + mse(target.forward_from(0, inputs[_first_input(0)], replace=replace))
        for name in ci:
            layer = int(name.split(".")[1])
            out = target.forward_from(layer, inputs[_first_input(layer)], replace={name: replace[name]})
            layerwise = layerwise + mse(out) / len(ci)
    importance = torch.tensor(0.0)
    p = annealed_p(settings, frac_of_training)
    for g in pre.values():
        per_row = (upper_leaky(g) + IMPORTANCE_EPS) ** p  # (R, C)
        importance = importance + (weights.unsqueeze(-1) * per_row).sum(0).div(n_samples).sum()
    return {
        "stochastic_recon": recon / settings.n_mask_samples,
        "stochastic_recon_layerwise": layerwise / settings.n_mask_samples,
        "importance_minimality": importance,
        "faithfulness": faithfulness(model),
    }


def _first_input(layer: int) -> str:
    """The module whose input is the residual stream entering ``layer``."""
    return f"layers.{layer}.mlp_in"


def total_loss(terms: dict[str, Tensor], settings: SpdTraining) -> Tensor:
    """The weighted sum the optimizer minimises."""
    return (
        settings.stochastic_recon_coeff * terms["stochastic_recon"]
        + settings.stochastic_recon_layerwise_coeff * terms["stochastic_recon_layerwise"]
        + settings.importance_minimality_coeff * terms["importance_minimality"]
        + settings.faithfulness_coeff * terms["faithfulness"]
    )


def faithfulness_warmup(model: Decomposition, settings: SpdTraining) -> float | None:
    """Fit the summed components to the target weights alone; returns the final faithfulness loss."""
    if settings.faithfulness_warmup_steps == 0:
        return None
    params = [*model.V.values(), *model.U.values()]
    optimizer = torch.optim.AdamW(
        params, lr=settings.faithfulness_warmup_lr, weight_decay=settings.faithfulness_warmup_weight_decay
    )
    loss = torch.tensor(0.0)
    for _ in range(settings.faithfulness_warmup_steps):
        optimizer.zero_grad()
        loss = faithfulness(model)
        loss.backward()
        optimizer.step()
    return float(loss.detach())


def train_spd(
    target: ResidMLP,
    settings: SpdTraining,
    *,
    seed: int,
    progress: Callable[[Iterable[int], int], Iterator[int]] | None = None,
) -> tuple[Decomposition, TrainingLog]:
    """Decompose ``target``; ``progress(range, total)`` wraps the step loop (a progress bar)."""
    generator = torch.Generator().manual_seed(seed)
    config = SpdConfig(
        toy=target.config,
        modules=tuple(_module_names(target)),
        C=settings.C,
        ci_hidden=tuple(settings.ci_hidden),
    )
    model = Decomposition(target, config, generator)
    log = TrainingLog(warmup_faithfulness=faithfulness_warmup(model, settings))
    params = [p for name, p in model.named_parameters() if not name.startswith("target.")]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    probability = settings.feature_probability or target.config.feature_probability
    n_features = target.config.n_features
    steps = range(settings.steps)
    for step in progress(steps, settings.steps) if progress is not None else steps:
        x = sparse_features(settings.batch_size, n_features, probability, generator)  # (B, n_features)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(settings, step)
        optimizer.zero_grad()
        terms = losses(model, x, settings, generator, step / settings.steps)
        loss = total_loss(terms, settings)
        loss.backward()
        optimizer.step()
        if step % settings.log_every == 0 or step == settings.steps - 1:
            log.rows.append(
                {
                    "step": step,
                    "loss": float(loss.detach()),
                    **{k: float(v.detach()) for k, v in terms.items()},
                }
            )
    return model.eval(), log


def _module_names(target: ResidMLP) -> list[str]:
    return [f"layers.{i}.{part}" for i in range(target.config.n_layers) for part in ("mlp_in", "mlp_out")]


def feature_ci(model: Decomposition, magnitude: float = 1.0) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """CI and pre-sigmoid outputs per module for each feature's one-hot input at ``magnitude``.

    Returns ``(ci, pre_sigmoid)``, each module → ``(n_features, C)``.
    """
    n = model.config.toy.n_features
    inputs: dict[str, Tensor] = {}
    with torch.no_grad():
        model.target(torch.eye(n) * magnitude, inputs=inputs)  # row i is magnitude * e_i
        pre = model.causal_importance(inputs)
    return {name: lower_leaky(g) for name, g in pre.items()}, pre


def spd_tensors(model: Decomposition) -> dict[str, Tensor]:
    """Every tensor of the decomposition (target included) by state-dict name, on the CPU."""
    return {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}


def spd_from_arrays(config: SpdConfig, arrays: dict[str, Any]) -> Decomposition:
    """A :class:`Decomposition` from :func:`spd_tensors`' names (numpy arrays or tensors), in eval mode."""
    target_arrays = {k.removeprefix("target."): v for k, v in arrays.items() if k.startswith("target.")}
    target = toy_from_arrays(config.toy, target_arrays)
    model = Decomposition(target, config, torch.Generator().manual_seed(0))
    tensors = {name: torch.as_tensor(np.asarray(value)) for name, value in arrays.items()}
    model.load_state_dict(tensors, strict=True)
    model.requires_grad_(False)
    return model.eval()


def load_spd_checkpoint(folder: Path) -> Decomposition:
    """The decomposition saved in ``folder`` (``spd_model.safetensors`` + ``spd_config.json``)."""
    from safetensors.torch import load_file

    config = SpdConfig.from_json(json.loads((folder / SPD_CONFIG_FILE).read_text(encoding="utf-8")))
    return spd_from_arrays(config, dict(load_file(str(folder / SPD_WEIGHTS_FILE))))


def evaluate(
    model: Decomposition, settings: SpdTraining, generator: torch.Generator, n_batches: int, threshold: float
) -> dict[str, Any]:
    """Mean of every loss over ``n_batches`` fresh batches, plus the CI-masked reconstruction and CI L0."""
    totals: dict[str, float] = {}
    l0: dict[str, float] = {name: 0.0 for name in model.config.modules}
    probability = settings.feature_probability or model.config.toy.feature_probability
    with torch.no_grad():
        for _ in range(n_batches):
            x = sparse_features(settings.batch_size, model.config.toy.n_features, probability, generator)
            terms = {k: float(v) for k, v in losses(model, x, settings, generator).items()}
            inputs: dict[str, Tensor] = {}
            target_out = model.target(x, inputs=inputs)
            ci = {name: lower_leaky(g) for name, g in model.causal_importance(inputs).items()}
            replace = {name: model.masked(name, c) for name, c in ci.items()}
            terms["ci_masked_recon"] = float(F.mse_loss(model.target(x, replace=replace), target_out))
            for name, c in ci.items():
                l0[name] += float((c > threshold).sum(-1).float().mean()) / n_batches
            for key, value in terms.items():
                totals[key] = totals.get(key, 0.0) + value / n_batches
    return {**totals, "ci_l0": l0}
