"""How ``magnitude_sweep_lm`` computes on a language model; ``__init__.py`` declares it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from analyses.magnitude_sweep import MagnitudeSweepLmParams, MagnitudeSweepLmResult
from analyses.magnitude_sweep.plots import Panel, draw_grid, fit_slopes
from analyses.magnitude_sweep.toy import magnitudes_of
from runner.errors import ResourceError
from runner.hooks import hook_name, parse_hook, require_layers
from runner.step import StepContext, StepOutput

if TYPE_CHECKING:
    from runner.saes.loading import LoadedSAE

__all__ = ["Target", "resolve_target", "run", "sweep_lm"]


@dataclass
class Target:
    """Where and what the sweep writes: ``hook``'s value gets ``magnitude * vector`` (or one entry set)."""

    hook: str
    vector: Tensor
    """``(d_hook,)`` direction."""
    index: int | None
    """The one-hot entry (neuron or residual dimension), None for an SAE direction."""
    first_layer: int
    """The first layer whose MLP reads the edited value."""
    label: str


def resolve_target(ctx: StepContext, params: MagnitudeSweepLmParams, where: str) -> Target:
    """The hook and direction of ``params.direction``, checked against the model (located errors)."""
    cfg = ctx.model.model.cfg
    d_mlp, d_model = int(cfg.d_mlp or 0), int(cfg.d_model)
    direction = params.direction
    if direction.neuron is not None:
        layer, neuron = direction.neuron
        require_layers([layer], cfg.n_layers, model=ctx.model.name, where=where, field="direction.neuron")
        _check_index(neuron, d_mlp, "direction.neuron", "neurons per layer (d_mlp)", where)
        vector = torch.zeros(d_mlp)
        vector[neuron] = 1.0
        return Target(
            hook_name("mlp_post", layer), vector, neuron, layer, f"neuron {neuron} of layer {layer}"
        )
    if direction.residual is not None:
        layer, dim = direction.residual
        require_layers([layer], cfg.n_layers, model=ctx.model.name, where=where, field="direction.residual")
        _check_index(dim, d_model, "direction.residual", "residual dimensions (d_model)", where)
        vector = torch.zeros(d_model)
        vector[dim] = 1.0
        first = layer + 1 if direction.site in ("resid_post", "mlp_out") else layer
        hook = hook_name(direction.site, layer)
        return Target(hook, vector, dim, first, f"residual dimension {dim} at {hook}")
    assert direction.sae_feature is not None and params.sae is not None
    sae = _single_sae(ctx, params.sae, None, where, "sae")
    _check_index(direction.sae_feature, sae.d_sae, "direction.sae_feature", "features in the SAE", where)
    parsed = parse_hook(sae.hook_name)
    first = 0 if parsed is None else parsed[0] + (1 if parsed[1] in ("resid_post", "mlp_out") else 0)
    vector = sae.sae.W_dec[direction.sae_feature].detach().float().cpu()  # (d_in,)
    label = f"SAE feature {direction.sae_feature} ({sae.source}) at {sae.hook_name}"
    return Target(sae.hook_name, vector, None, first, label)


def _check_index(index: int, size: int, field: str, what: str, where: str) -> None:
    if not 0 <= index < size:
        raise ResourceError(
            f"{where}: `{field}` {index} is out of range: the model has {size} {what} (0-{size - 1}).\n"
            f"Set `{field}` within that range."
        )


def _single_sae(ctx: StepContext, source: Any, layer: int | None, where: str, field: str) -> LoadedSAE:
    saes = ctx.saes(source, layers=None if layer is None else (layer,), site=None, where=where)
    if len(saes) != 1:
        raise ResourceError(
            f"{where}: `{field}` gives {len(saes)} SAEs (layers {[s.layer for s in saes]}); "
            "the sweep uses one.\n"
            f"Pick one with `{field}` naming a single SAE{' or `gates_layer`' if field == 'gates' else ''}."
        )
    return saes[0]


def run(ctx: StepContext, params: MagnitudeSweepLmParams) -> StepOutput:
    """Sweep the direction's magnitude; record later neurons, logits and gate features at one position."""
    where = f"magnitude_sweep_lm case {ctx.case_id}"
    model = ctx.model.model
    target = resolve_target(ctx, params, where)
    tokens = model.to_tokens(params.prompt, prepend_bos=True)  # (1, T)
    n_tokens = tokens.shape[1]
    if not -n_tokens <= params.read_position < n_tokens:
        raise ResourceError(
            f"{where}: `read_position` {params.read_position} is outside the prompt's {n_tokens} tokens.\n"
            f"Use a position from {-n_tokens} to {n_tokens - 1}."
        )
    position = params.read_position % n_tokens
    layers = _record_layers(ctx, params, target, where)
    gates = _single_sae(ctx, params.gates, params.gates_layer, where, "gates") if params.gates else None
    magnitudes = magnitudes_of(params)
    recorded = sweep_lm(model, tokens, target, magnitudes, params, position, layers, gates)
    return _output(ctx, params, target, tokens, position, magnitudes, recorded, gates)


def _record_layers(ctx: StepContext, params: MagnitudeSweepLmParams, target: Target, where: str) -> list[int]:
    n_layers = ctx.model.model.cfg.n_layers
    if params.record_layers is None:
        return list(range(target.first_layer, n_layers))
    return require_layers(
        params.record_layers, n_layers, model=ctx.model.name, where=where, field="record_layers"
    )


@dataclass
class Recorded:
    """Values at the read position, one row per magnitude."""

    neurons: dict[int, Tensor]
    """Layer → ``(n_steps, d_mlp)``."""
    logits: Tensor
    """``(n_steps, d_vocab)``."""
    gate_in: Tensor | None
    """``(n_steps, d_in)`` activations at the gates' hook."""
    baseline: float | None


def sweep_lm(
    model: Any,
    tokens: Tensor,
    target: Target,
    magnitudes: Tensor,
    params: MagnitudeSweepLmParams,
    position: int,
    layers: list[int],
    gates: LoadedSAE | None,
) -> Recorded:
    """Forward passes of the prompt, ``batch_size`` magnitudes at a time, each row with its own edit."""
    device = tokens.device
    vector = target.vector.to(device)
    parts: dict[str, list[Tensor]] = {}
    baseline: list[float] = []

    def record(name: str) -> Callable[[Tensor, Any], None]:
        def hook(value: Tensor, hook: Any) -> None:
            parts.setdefault(name, []).append(value[:, position].detach().float().cpu())

        return hook

    for chunk in magnitudes.split(params.batch_size):
        m = chunk.to(device)

        def edit(value: Tensor, hook: Any, m: Tensor = m) -> Tensor:
            if target.index is not None and not baseline:
                baseline.append(float(value[0, position, target.index]))
            where = slice(None) if params.positions == "all" else slice(position, position + 1)
            if params.mode == "set":
                assert target.index is not None
                value[:, where, target.index] = m[:, None].to(value.dtype)
            else:
                value[:, where] = value[:, where] + (m[:, None, None] * vector).to(value.dtype)
            return value

        hooks: list[tuple[str, Callable[..., Any]]] = [(target.hook, edit)]
        hooks += [(hook_name("mlp_post", layer), record(f"neurons.{layer}")) for layer in layers]
        if gates is not None:
            hooks.append((gates.hook_name, record("gates")))
        with torch.no_grad():
            logits = model.run_with_hooks(tokens.expand(len(chunk), -1), fwd_hooks=hooks)  # (b, T, vocab)
        parts.setdefault("logits", []).append(logits[:, position].float().cpu())
    return Recorded(
        neurons={layer: torch.cat(parts[f"neurons.{layer}"]) for layer in layers},
        logits=torch.cat(parts["logits"]),
        gate_in=torch.cat(parts["gates"]) if gates is not None else None,
        baseline=baseline[0] if baseline else None,
    )


def _gate_values(gates: LoadedSAE, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(acts, pre, inner)`` of every SAE feature, each ``(n_steps, d_sae)``."""
    sae = gates.sae
    with torch.no_grad():
        x = x.to(sae.W_enc.device)
        acts = gates.encode(x).float()
        if gates.center_input:
            x = x - x.mean(dim=-1, keepdim=True)
        inner = sae.process_sae_in(x) @ sae.W_enc  # (n_steps, d_sae)
        pre = inner + sae.b_enc
    return acts.cpu(), pre.float().cpu(), inner.float().cpu()


def _tokens(ctx: StepContext, params: MagnitudeSweepLmParams, logits: Tensor, where: str) -> list[int]:
    tokenizer = ctx.model.tokenizer
    ids = []
    for text in params.tokens:
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if len(encoded) != 1:
            raise ResourceError(
                f"{where}: `tokens` entry {text!r} is {len(encoded)} tokens for {ctx.model.name}'s "
                "tokenizer; "
                "each must be exactly one.\nWrite it as the tokenizer splits it (often with a leading space)."
            )
        ids.append(int(encoded[0]))
    change = logits[-1] - logits[0]  # (vocab,)
    if params.top_tokens:
        ids += [int(i) for i in torch.topk(change, params.top_tokens).indices]
        ids += [int(i) for i in torch.topk(-change, params.top_tokens).indices]
    return list(dict.fromkeys(ids))


def _output(
    ctx: StepContext,
    params: MagnitudeSweepLmParams,
    target: Target,
    tokens: Tensor,
    position: int,
    magnitudes: Tensor,
    recorded: Recorded,
    gates: LoadedSAE | None,
) -> StepOutput:
    where = f"magnitude_sweep_lm case {ctx.case_id}"
    m = magnitudes.numpy()
    ranges = [
        (float(v[:, n].max() - v[:, n].min()), layer, n)
        for layer, v in recorded.neurons.items()
        for n in range(v.shape[1])
    ]
    top = sorted(ranges, key=lambda r: -r[0])[: params.max_neurons]
    token_ids = _tokens(ctx, params, recorded.logits, where)
    token_text = [str(ctx.model.tokenizer.decode([i])) for i in token_ids]
    logits = recorded.logits[:, token_ids].numpy()  # (n_steps, n_tokens)
    slopes = {}
    for j, text in enumerate(token_text):
        negative, positive = fit_slopes(m, logits[:, j])
        slopes[f"{token_ids[j]}:{text}"] = {
            "negative": negative if params.range == "symmetric" else None,
            "positive": positive,
        }
    gate_features: list[int] = []
    gate_max: list[float] = []
    ci = pre = inner = None
    if gates is not None and recorded.gate_in is not None:
        acts, pre_all, inner_all = _gate_values(gates, recorded.gate_in)
        peak = acts.max(0).values
        gate_features = [
            int(f) for f in torch.argsort(peak, descending=True, stable=True) if peak[f] > params.ci_threshold
        ]
        gate_max = [float(peak[f]) for f in gate_features]
        ci, pre, inner = (t[:, gate_features].numpy() for t in (acts, pre_all, inner_all))
    str_tokens = [str(ctx.model.tokenizer.decode([int(t)])) for t in tokens[0]]
    result = MagnitudeSweepLmResult(
        model=ctx.model.name,
        hook=target.hook,
        direction=target.label,
        prompt_tokens=str_tokens,
        read_position=position,
        magnitudes=m,
        baseline_value=recorded.baseline,
        neurons={layer: v.numpy() for layer, v in recorded.neurons.items()},
        top_neurons=[(layer, n) for _, layer, n in top],
        neuron_range=[r for r, _, _ in top],
        tokens=token_text,
        logits=logits,
        logit_slopes=slopes,
        gate_hook=gates.hook_name if gates is not None else None,
        gate_features=gate_features,
        gate_max=gate_max,
        ci=ci,
        pre_sigmoid=pre,
        gate_inputs=inner,
    )
    panels = [
        Panel(f"L{layer} neuron {n}", recorded.neurons[layer][:, n].numpy(), "neuron") for _, layer, n in top
    ]
    panels += [Panel(f"logit {text!r}", logits[:, j], "output") for j, text in enumerate(token_text)]
    shown = range(min(len(gate_features), params.max_components))
    if ci is not None and pre is not None and inner is not None:
        panels += [Panel(f"SAE feature {gate_features[k]}", ci[:, k], "ci") for k in shown]
        panels += [Panel(f"pre-act {gate_features[k]}", pre[:, k], "gate_output") for k in shown]
        panels += [Panel(f"inner act {gate_features[k]}", inner[:, k], "gate_input") for k in shown]
    title = (
        f"{ctx.model.name}: {target.label} swept ({params.mode}); "
        f"read at token {position} {str_tokens[position]!r}"
    )
    slug = target.hook.replace(".", "_") + (f"_{target.index}" if target.index is not None else "")
    plot = draw_grid(m, panels, title, params.figsize_per_subplot, params.dpi)
    data = {"magnitude_sweep.npz": _npz(result), "logits.csv": _logit_rows(m, token_text, logits)}
    return StepOutput(result=result, data=data, plots={f"unified_grid_{slug}.png": plot})


def _npz(result: MagnitudeSweepLmResult) -> dict[str, np.ndarray]:
    arrays = {"magnitudes": result.magnitudes, "logits": result.logits}
    arrays.update({f"neurons/layer_{k}": v for k, v in result.neurons.items()})
    for key in ("ci", "pre_sigmoid", "gate_inputs"):
        value = getattr(result, key)
        if value is not None:
            arrays[f"gates/{key}"] = value
    return arrays


def _logit_rows(m: np.ndarray, tokens: list[str], logits: np.ndarray) -> list[dict[str, Any]]:
    return [
        {"magnitude": float(x), **{t: float(v) for t, v in zip(tokens, row, strict=True)}}
        for x, row in zip(m, logits, strict=True)
    ]
