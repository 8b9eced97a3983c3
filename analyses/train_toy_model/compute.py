"""How ``train_toy_model`` computes; ``__init__.py`` declares it (params, result, registration)."""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from matplotlib.figure import Figure

from analyses._toy_model import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    ResidMLP,
    ToyConfig,
    dedupe_empty,
    init_embedding,
    small_work_threads,
    sparse_features,
    toy_labels,
    toy_tensors,
)
from analyses.train_toy_model import TrainToyModelParams, TrainToyModelResult
from runner.step import StepContext, StepOutput

__all__ = ["build_model", "run", "train"]


def run(ctx: StepContext, params: TrainToyModelParams) -> StepOutput:
    """Train the toy model, measure it, and return it with its checkpoint files."""
    with small_work_threads(params.batch_size * params.d_embed):
        return _run(ctx, params)


def _run(ctx: StepContext, params: TrainToyModelParams) -> StepOutput:
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(ctx.seed)
    model = build_model(params, generator)
    importance = params.importance_val ** torch.arange(params.n_features, dtype=torch.float32)  # (F,)
    log = train(model, params, importance, generator, ctx)
    final = _mean_loss(model, params, importance, generator, params.final_loss_batches)
    identity = _mean_loss(model, params, importance, generator, params.final_loss_batches, identity=True)
    with torch.no_grad():
        eye = torch.eye(params.n_features)
        one_hot_error = float((model(eye) - toy_labels(eye, model.label_coeffs)).diagonal().abs().mean())
    tensors = toy_tensors(model)
    result = TrainToyModelResult(
        toy_config=model.config.to_json(),
        n_features=params.n_features,
        d_embed=params.d_embed,
        d_mlp=params.d_mlp,
        n_layers=params.n_layers,
        steps=params.steps,
        final_loss=final,
        identity_loss=identity,
        one_hot_error=one_hot_error,
        seconds=time.perf_counter() - started,
        tensors={name: t.numpy() for name, t in tensors.items()},
    )
    data = {
        WEIGHTS_FILE: tensors,
        CONFIG_FILE: model.config.to_json(),
        "label_coeffs.json": model.label_coeffs.tolist(),
        "training_log.csv": log,
    }
    return StepOutput(result=result, data=data, plots={"training_loss.png": _loss_plot(log, identity)})


def build_model(params: TrainToyModelParams, generator: torch.Generator) -> ResidMLP:
    """A fresh toy model: fixed random embedding, Kaiming-initialised MLPs, label coefficients set."""
    config = ToyConfig(
        n_features=params.n_features,
        d_embed=params.d_embed,
        d_mlp=params.d_mlp,
        n_layers=params.n_layers,
        in_bias=params.in_bias,
        out_bias=params.out_bias,
        feature_probability=params.feature_probability,
    )
    model = ResidMLP(config)
    init_embedding(model, generator)
    with torch.no_grad():
        for layer in model.layers:
            for linear in (layer.mlp_in, layer.mlp_out):
                d_out, d_in = linear.weight.shape
                linear.weight.copy_(torch.randn(d_out, d_in, generator=generator) / math.sqrt(d_in))
                if linear.bias is not None:
                    linear.bias.zero_()
        if params.label_coeffs == "random":
            label_generator = torch.Generator().manual_seed(params.label_seed)
            model.label_coeffs.copy_(torch.rand(params.n_features, generator=label_generator) + 1)
    return model


def _loss(model: ResidMLP, x: torch.Tensor, importance: torch.Tensor, identity: bool = False) -> torch.Tensor:
    """Importance-weighted MSE per output element of the model (or of ``x W_E W_U`` with ``identity``).

    Samples without an active feature are computed once, weighted by their count (same loss).
    """
    rows, weights = dedupe_empty(x)  # (R, F), (R,)
    out = (rows @ model.W_E @ model.W_U) if identity else model(rows)  # (R, F)
    squared = ((out - toy_labels(rows, model.label_coeffs)) ** 2) * importance  # (R, F)
    return (weights * squared.sum(-1)).sum() / x.numel()


def train(
    model: ResidMLP,
    params: TrainToyModelParams,
    importance: torch.Tensor,
    generator: torch.Generator,
    ctx: StepContext | None = None,
) -> list[dict[str, float]]:
    """AdamW on fresh sparse batches with a half-cosine learning rate; returns the loss log."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=params.lr, weight_decay=params.weight_decay)
    steps = range(params.steps)
    log: list[dict[str, float]] = []
    every = max(1, params.steps // 200)
    for step in ctx.progress(steps, params.steps, "toy model steps") if ctx is not None else steps:
        lr = params.lr * 0.5 * (1 + math.cos(math.pi * step / max(params.steps - 1, 1)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        x = sparse_features(params.batch_size, params.n_features, params.feature_probability, generator)
        optimizer.zero_grad()
        loss = _loss(model, x, importance)
        loss.backward()
        optimizer.step()
        if step % every == 0 or step == params.steps - 1:
            log.append({"step": step, "lr": lr, "loss": float(loss.detach())})
    model.requires_grad_(False)
    return log


def _mean_loss(
    model: ResidMLP,
    params: TrainToyModelParams,
    importance: torch.Tensor,
    generator: torch.Generator,
    n_batches: int,
    identity: bool = False,
) -> float:
    with torch.no_grad():
        values = [
            float(
                _loss(
                    model,
                    sparse_features(
                        params.batch_size, params.n_features, params.feature_probability, generator
                    ),
                    importance,
                    identity,
                )
            )
            for _ in range(n_batches)
        ]
    return float(np.mean(values))


def _loss_plot(log: list[dict[str, float]], identity: float) -> Figure:
    figure = Figure(figsize=(6, 3.5), layout="constrained")
    ax = figure.add_subplot()
    ax.plot([r["step"] for r in log], [r["loss"] for r in log], lw=1.2, label="training loss")
    ax.axhline(identity, color="grey", ls="--", lw=1, label="MLPs removed")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("importance-weighted MSE")
    ax.legend(fontsize=8)
    return figure
