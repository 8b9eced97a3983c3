"""How ``super_weight_vocab`` computes; ``__init__.py`` declares it (params, result, registration)."""

from __future__ import annotations

import math
import re
import string
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from matplotlib.figure import Figure

from analyses._weights import PADDING, TENSOR, Neuron, SuperWeight, random_controls, zeroed
from analyses.super_weight_vocab import SuperWeightVocabParams, SuperWeightVocabResult
from analyses.super_weights import SuperWeightsResult
from runner.errors import ResourceError
from runner.hooks import require_layers
from runner.step import StepContext, StepOutput

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from runner.datasets import TokenDataset

__all__ = ["METRICS", "STOPWORDS", "Windows", "build_windows", "neuron_effects", "run", "window_metrics"]

METRICS = ("loss", "entropy", "topk_margin", "stopword_mass")
"""The per-position quantities whose change the intervention measures."""

_FUNCTION_WORDS = """
a about above after again against all am an and any are as at be because been before being below
between both but by can could did do does doing down during each few for from further had has
have having he her here hers herself him himself his how i if in into is it its itself just me
more most my myself no nor not now of off on once only or other our ours ourselves out over own
same she should so some such than that the their theirs them themselves then there these they
this those through to too under until up very was we were what when where which while who whom
why will with would you your yours yourself yourselves
"""
STOPWORDS = frozenset(_FUNCTION_WORDS.split())
"""English function words: the ``function_words`` class and the ``stopword_mass`` metric."""

FwdHooks = list[tuple[str | Callable[..., Any], Callable[..., Any]]]


# --- windows -------------------------------------------------------------------------------------------


@dataclass
class Windows:
    """The windows (``(n, window_len)``) and how they were cut."""

    tokens: torch.Tensor
    starts: list[int]
    bos: bool
    first_scored: int
    """The first scored position of a window (1 with ``drop_first_token``, else 0)."""
    unused: int
    """Text tokens among the first ``tokens`` that no window covers."""

    @property
    def scored_per_window(self) -> int:
        """Positions scored in each window: all that predict a token of the window, minus the first."""
        return self.tokens.shape[1] - 1 - self.first_scored


def _has_bos(dataset: TokenDataset, bos_id: int | None) -> bool:
    return bos_id is not None and bool((dataset.tokens[:, 0] == bos_id).all())


def build_windows(
    dataset: TokenDataset, bos_id: int | None, n_ctx: int, params: SuperWeightVocabParams
) -> Windows:
    """Cut ``params.tokens`` text tokens of ``dataset`` into windows.

    Raises a :class:`ResourceError` when the settings do not fit the dataset or the model's context.
    """
    bos = _has_bos(dataset, bos_id)
    stream = (dataset.tokens[:, 1:] if bos else dataset.tokens).reshape(-1)  # (n_text_tokens,)
    check_windows(params, available=int(stream.numel()), n_ctx=n_ctx, bos=bos, dataset=dataset)
    text_len = params.window_len - int(bos)
    starts = list(range(0, params.tokens - text_len + 1, params.stride))
    windows = torch.stack([stream[s : s + text_len] for s in starts])  # (n, text_len)
    if bos:
        windows = torch.cat(
            [torch.full((len(starts), 1), int(bos_id or 0)), windows], dim=1
        )  # (n, window_len)
    unused = params.tokens - (starts[-1] + text_len)
    return Windows(windows, starts, bos, int(params.drop_first_token), unused)


def check_windows(
    params: SuperWeightVocabParams, *, available: int, n_ctx: int, bos: bool, dataset: TokenDataset
) -> None:
    """Raise one :class:`ResourceError` listing every window setting that does not fit, and one that does."""
    problems = []
    if params.window_len > n_ctx:
        problems.append(f"window_len ({params.window_len}) exceeds the model's context of {n_ctx} tokens.")
    if params.tokens > available:
        per_passage = dataset.max_len - int(bos)
        needed = -(-params.tokens // per_passage)
        problems.append(
            f"tokens ({params.tokens}) exceeds the {available} text tokens of the dataset "
            f"({len(dataset)} passages × {per_passage}); raise dataset.max_passages to {needed} "
            "or lower tokens."
        )
    if params.stride > params.window_len - int(bos):
        problems.append(
            f"stride ({params.stride}) exceeds the {params.window_len - 1} text tokens of a window "
            "(BOS takes one position): tokens between windows would never be scored."
        )
    if not problems:
        return
    raise ResourceError(
        "super_weight_vocab: the window settings do not fit this dataset and model:\n- "
        + "\n- ".join(problems)
        + f"\nA setting that fits: {_recommend(params, available=available, n_ctx=n_ctx, bos=bos)}"
    )


def _recommend(params: SuperWeightVocabParams, *, available: int, n_ctx: int, bos: bool) -> str:
    """The closest window settings that fit, with windows that tile ``tokens`` exactly."""
    window_len = max(2 + int(params.drop_first_token), min(params.window_len, n_ctx, available + int(bos)))
    text_len = window_len - int(bos)
    stride = max(1, min(params.stride, text_len))
    tokens = min(params.tokens, available)
    tokens = text_len + (tokens - text_len) // stride * stride
    return f"tokens: {tokens}, window_len: {window_len}, stride: {stride}"


# --- per-position metrics --------------------------------------------------------------------------------


@dataclass
class Measured:
    """Per-window means of each metric, and the summed probability of every token over scored positions."""

    per_window: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in METRICS})
    prob_sum: torch.Tensor | None = None
    positions: int = 0
    cascade: dict[int, dict[str, list[float]]] = field(default_factory=dict)

    def means(self) -> dict[str, float]:
        """Each metric averaged over every scored position (windows score equally many)."""
        return {m: float(np.mean(v)) for m, v in self.per_window.items()}

    def add_probs(self, probs: torch.Tensor, positions: int) -> None:
        """Accumulate ``probs`` (``(V,)`` summed over ``positions`` scored positions)."""
        self.prob_sum = probs if self.prob_sum is None else self.prob_sum + probs
        self.positions += positions


def distribution_metrics(
    logits: torch.Tensor, margin_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities, entropy and top-k margin of ``logits`` ``(B, S, V)``; the last two ``(B, S)``."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)  # (B, S, V)
    probs = log_probs.exp()
    entropy = -(probs * log_probs).sum(-1)  # (B, S)
    top = probs.topk(margin_k, dim=-1).values  # (B, S, k)
    return log_probs, entropy, top[..., 0] - top[..., -1]


def window_metrics(
    logits: torch.Tensor, tokens: torch.Tensor, *, first: int, stop_ids: torch.Tensor, margin_k: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-window means of :data:`METRICS` over positions ``first .. T-2``, and the summed probabilities.

    ``logits`` is ``(B, T, V)`` for ``tokens`` ``(B, T)``; position ``t`` predicts token ``t + 1``.
    """
    log_probs, entropy, margin = distribution_metrics(logits[:, first:-1], margin_k)  # (B, S, V), (B, S)
    targets = tokens[:, first + 1 :].to(log_probs.device)  # (B, S)
    loss = -log_probs.gather(-1, targets[..., None])[..., 0]  # (B, S)
    probs = log_probs.exp()
    stop = probs[..., stop_ids.to(probs.device)].sum(-1)  # (B, S)
    means = {"loss": loss, "entropy": entropy, "topk_margin": margin, "stopword_mass": stop}
    return {k: v.mean(1).double().cpu() for k, v in means.items()}, probs.sum((0, 1)).double().cpu()


def lens_metrics(
    model: HookedTransformer, resid: torch.Tensor, *, first: int, margin_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-window mean entropy and margin of the logit lens on ``resid`` (``(B, T, d_model)``)."""
    logits = model.unembed(model.ln_final(resid[:, first:-1]))  # (B, S, V)
    _, entropy, margin = distribution_metrics(logits, margin_k)
    return entropy.mean(1).double().cpu(), margin.mean(1).double().cpu()


def measure(
    ctx: StepContext,
    windows: Windows,
    params: SuperWeightVocabParams,
    stop_ids: torch.Tensor,
    cascade_layers: Sequence[int],
    label: str,
) -> Measured:
    """Run every window through the model as it is now; cascade at ``cascade_layers`` (may be empty)."""
    model = ctx.model.model
    device = next(model.parameters()).device
    result = Measured(cascade={layer: {"entropy": [], "topk_margin": []} for layer in cascade_layers})
    batches = [
        windows.tokens[i : i + params.batch_size] for i in range(0, len(windows.tokens), params.batch_size)
    ]
    for batch in ctx.progress(batches, len(batches), label):
        resids: dict[int, torch.Tensor] = {}

        def keep(act: torch.Tensor, hook: Any, resids: dict[int, torch.Tensor] = resids) -> None:
            resids[int(hook.layer())] = act

        hooks: FwdHooks = [(f"blocks.{layer}.hook_resid_post", keep) for layer in cascade_layers]
        with torch.no_grad():
            logits = model.run_with_hooks(
                batch.to(device), padding_side=PADDING, fwd_hooks=hooks
            )  # (B, T, V)
            means, probs = window_metrics(
                logits, batch, first=windows.first_scored, stop_ids=stop_ids, margin_k=params.margin_k
            )
            for layer, resid in resids.items():
                entropy, margin = lens_metrics(
                    model, resid, first=windows.first_scored, margin_k=params.margin_k
                )
                result.cascade[layer]["entropy"] += entropy.tolist()
                result.cascade[layer]["topk_margin"] += margin.tolist()
        for metric in METRICS:
            result.per_window[metric] += means[metric].tolist()
        result.add_probs(probs, len(batch) * windows.scored_per_window)
    return result


# --- vocabulary ------------------------------------------------------------------------------------------


@dataclass
class Vocabulary:
    """Every token's id, raw token and decoded string, and the classes it belongs to."""

    toks: list[str]
    strs: list[str]
    classes: dict[str, np.ndarray]
    """Class name → boolean mask over the vocabulary."""

    @classmethod
    def of(cls, tokenizer: Any, d_vocab: int) -> Vocabulary:
        """Decode the whole vocabulary once (``d_vocab`` may exceed the tokenizer's size: padding rows)."""
        n = min(len(tokenizer), d_vocab)
        toks = [str(t) for t in tokenizer.convert_ids_to_tokens(list(range(n)))] + [""] * (d_vocab - n)
        strs = list(tokenizer.batch_decode([[i] for i in range(n)])) + [""] * (d_vocab - n)
        return cls(toks, strs, token_classes(strs))

    def describe(self, ids: Iterable[Any], values: Iterable[Any], key: str) -> list[dict[str, Any]]:
        """``[{"id", "tok", "str", key}]`` for the seed's token lists."""
        return [
            {"id": int(i), "tok": self.toks[i], "str": self.strs[i], key: float(v)}
            for i, v in zip(ids, values, strict=True)
        ]


PUNCTUATION = set(string.punctuation) | set("«»“”‘’—–…")


def token_classes(strs: Sequence[str]) -> dict[str, np.ndarray]:
    """Boolean masks of the token classes used for enrichment (a token may be in several)."""
    stripped = [s.strip() for s in strs]
    rules = {
        "digits_years": lambda s, t: bool(t) and t.isdigit(),
        "punctuation_brackets": lambda s, t: bool(t) and all(c in PUNCTUATION for c in t),
        "function_words": lambda s, t: t.lower() in STOPWORDS,
        "whitespace_newlines": lambda s, t: bool(s) and not t,
        "capitalized_words": lambda s, t: t.isalpha() and t[:1].isupper(),
        "word_starts": lambda s, t: s[:1].isspace() and t.isalpha(),
        "subword_continuations": lambda s, t: bool(s) and s[:1].isalpha(),
        "code_identifiers": lambda s, t: bool(re.fullmatch(r"[A-Za-z_]*_[A-Za-z_]*|[a-z]+[A-Z]\w*", t)),
    }
    return {
        name: np.array([rule(s, t) for s, t in zip(strs, stripped, strict=True)])
        for name, rule in rules.items()
    }


def final_gain(model: HookedTransformer, direction: torch.Tensor) -> torch.Tensor:
    """``direction`` as the final norm passes it on, up to the per-token scale.

    The norm's gain is applied; LayerNorm also centres the direction.
    """
    ln_final = model.ln_final
    if model.cfg.normalization_type in ("LN", "LNPre"):
        direction = direction - direction.mean()
    gain = getattr(ln_final, "w", None)
    return direction * gain if isinstance(gain, torch.Tensor) else direction


def neuron_effects(model: HookedTransformer, layer: int, neuron: int) -> tuple[np.ndarray, np.ndarray]:
    """Direct logit effect of one unit of ``neuron``'s activation, and its cosine variant: ``(V,)`` each."""
    with torch.no_grad():
        direction = final_gain(model, Neuron(layer, neuron).output(model).double())  # (d_model,)
        w_u = model.W_U.double()  # (d_model, V)
        effects = direction @ w_u  # (V,)
        cosine = effects / (direction.norm() * w_u.norm(dim=0)).clamp_min(1e-12)
    return effects.cpu().numpy(), cosine.cpu().numpy()


def moments(values: np.ndarray) -> dict[str, float]:
    """Variance, skew and excess kurtosis (0 for a normal distribution) of ``values``."""
    centred = values - values.mean()
    var = float((centred**2).mean())
    if var == 0:
        return {"var": 0.0, "skew": 0.0, "kurt": 0.0}
    std = math.sqrt(var)
    return {
        "var": var,
        "skew": float((centred**3).mean() / std**3),
        "kurt": float((centred**4).mean() / var**2 - 3.0),
    }


def enrichment(effects: np.ndarray, vocab: Vocabulary, top_k: int) -> list[dict[str, Any]]:
    """Per class: standardized mean effect (``score``), share among the top-k promoted / suppressed tokens."""
    std = float(effects.std()) or 1.0
    up, down = np.argsort(-effects)[:top_k], np.argsort(effects)[:top_k]
    rows = []
    for name, mask in vocab.classes.items():
        if not mask.any():
            continue
        members = np.flatnonzero(mask)
        best = members[np.argsort(-effects[members])[:3]]
        rows.append(
            {
                "class": name,
                "score": float((effects[mask].mean() - effects.mean()) / std),
                "n_tokens": int(mask.sum()),
                "base_rate": float(mask.mean()),
                "top_up_share": float(mask[up].mean()),
                "top_down_share": float(mask[down].mean()),
                "examples": [vocab.strs[i] for i in best],
            }
        )
    return sorted(rows, key=lambda r: -abs(r["score"]))


def neuron_card(
    ctx: StepContext, params: SuperWeightVocabParams, vocab: Vocabulary, layer: int, neuron: int
) -> tuple[dict[str, Any], np.ndarray]:
    """The seed's neuron card, and the effects it was computed from."""
    effects, cosine = neuron_effects(ctx.model.model, layer, neuron)
    shape = moments(effects)
    up, down = np.argsort(-effects)[: params.top_k], np.argsort(effects)[: params.top_k]
    card: dict[str, Any] = {
        "model": ctx.model.name,
        "layer": layer,
        "neuron": neuron,
        "moments": shape,
        "moments_cos": moments(cosine) if params.cosine else None,
        "top_tokens_up": vocab.describe(up, effects[up], "effect"),
        "top_tokens_down": vocab.describe(down, effects[down], "effect"),
        "enrichment": enrichment(effects, vocab, params.top_k) if params.enrichment else None,
        "label": _label(shape, params.label_kurtosis),
    }
    if params.cosine:
        cos_up = np.argsort(-cosine)[: params.top_k]
        card["top_tokens_up_cos"] = vocab.describe(cos_up, cosine[cos_up], "effect")
    return card, effects


def _label(shape: dict[str, float], kurtosis: float) -> str:
    if shape["kurt"] < kurtosis:
        return "none"
    return "prediction" if shape["skew"] > 0 else "suppression"


# --- interventions ---------------------------------------------------------------------------------------


def deltas(modified: Measured, base: Measured) -> dict[str, float]:
    """Mean change of each metric (modified minus baseline)."""
    return {m: modified.means()[m] - base.means()[m] for m in METRICS}


def bootstrap_ci(modified: Measured, base: Measured, samples: int, seed: int) -> dict[str, dict[str, float]]:
    """Percentile 95% intervals of each mean delta, resampling windows (paired) with replacement."""
    rng = np.random.default_rng(seed)
    out = {}
    for metric in METRICS:
        per_window = np.array(modified.per_window[metric]) - np.array(base.per_window[metric])  # (n,)
        picks = rng.integers(0, len(per_window), size=(samples, len(per_window)))
        means = per_window[picks].mean(axis=1)  # (samples,)
        out[metric] = {
            "mean": float(per_window.mean()),
            "ci_2.5": float(np.percentile(means, 2.5)),
            "ci_97.5": float(np.percentile(means, 97.5)),
        }
    return out


def prob_changes(
    modified: Measured, base: Measured, vocab: Vocabulary, k: int
) -> dict[str, list[dict[str, Any]]]:
    """The tokens whose mean probability over scored positions rises and falls most."""
    assert modified.prob_sum is not None and base.prob_sum is not None
    base_mean = (base.prob_sum / base.positions).numpy()
    change = (modified.prob_sum / modified.positions).numpy() - base_mean
    up, down = np.argsort(-change)[:k], np.argsort(change)[:k]

    def rows(ids: np.ndarray) -> list[dict[str, Any]]:
        described = vocab.describe(ids, change[ids], "delta_prob")
        return [{**row, "base_prob": float(base_mean[row["id"]])} for row in described]

    return {"up": rows(up), "down": rows(down)}


def cascade_deltas(modified: Measured, base: Measured) -> dict[str, list[Any]]:
    """The seed's cascade record: layers, mean change in lens entropy and margin at each."""
    layers = sorted(base.cascade)

    def delta(layer: int, metric: str) -> float:
        return float(np.mean(modified.cascade[layer][metric]) - np.mean(base.cascade[layer][metric]))

    return {
        "layers": layers,
        "delta_entropy": [delta(layer, "entropy") for layer in layers],
        "delta_margin": [delta(layer, "topk_margin") for layer in layers],
    }


# --- the analysis ---------------------------------------------------------------------------------------


@dataclass
class Target:
    """A weight to analyse, and what the detection step measured about it (if anything)."""

    weight: SuperWeight
    detected: dict[str, Any] = field(default_factory=dict)


def run(ctx: StepContext, params: SuperWeightVocabParams) -> StepOutput:
    """Vocabulary effects, windowed interventions with controls, and logit-lens cascades of super weights."""
    start = time.perf_counter()
    targets = _targets(ctx, params)
    model = ctx.model.model
    windows = build_windows(
        ctx.dataset, getattr(ctx.model.tokenizer, "bos_token_id", None), model.cfg.n_ctx, params
    )
    _note_windows(ctx, params, windows)
    if not targets:
        ctx.note(f"Step {params.from_step!r} found no super weights on {ctx.model.name}; nothing to analyse.")
        return StepOutput(result=_summary(ctx, params, windows, [], [], None))
    vocab = Vocabulary.of(ctx.model.tokenizer, model.cfg.d_vocab)
    stop_ids = torch.from_numpy(np.flatnonzero(vocab.classes["function_words"]))
    cascade_layers = _cascade_layers(ctx, params)
    base = measure(ctx, windows, params, stop_ids, cascade_layers, "vocab: baseline")
    neurons: dict[tuple[int, int], tuple[dict[str, Any], np.ndarray]] = {}
    for target in targets:
        key = (target.weight.layer, target.weight.col)
        if key not in neurons:
            neurons[key] = neuron_card(ctx, params, vocab, *key)
    controls = random_controls(model, [t.weight for t in targets], np.random.default_rng(ctx.seed))
    cards = [
        _intervene(ctx, params, windows, vocab, stop_ids, cascade_layers, base, target, control)
        for target, control in zip(targets, controls, strict=True)
    ]
    neuron_cards = [card for card, _ in neurons.values()]
    seconds = time.perf_counter() - start
    return StepOutput(
        result=_summary(ctx, params, windows, cards, neuron_cards, base),
        data=_data_files(params, windows, cards, neuron_cards, seconds),
        plots=_plots(ctx, cards, neurons),
    )


def _targets(ctx: StepContext, params: SuperWeightVocabParams) -> list[Target]:
    """The weights to analyse: listed in the params, or the detection step's, strongest first."""
    if params.weights is not None:
        targets = [Target(SuperWeight(*w)) for w in params.weights]
        _check_listed(ctx, [t.weight for t in targets])
    else:
        targets = _detected(ctx, params.from_step)
    return targets[: params.max_weights] if params.max_weights else targets


def _check_listed(ctx: StepContext, weights: list[SuperWeight]) -> None:
    """Weights listed in the params exist: their layers, then their rows and columns."""
    where = f"super_weight_vocab case {ctx.case_id}"
    layers = [w.layer for w in weights]
    require_layers(layers, ctx.model.n_layers, model=ctx.model.name, where=where, field="weights")
    for weight in weights:
        rows, cols = weight.shape(ctx.model.model)  # a clear error for MoE layers
        if not (0 <= weight.row < rows and 0 <= weight.col < cols):
            raise ResourceError(
                f"{where}: {weight.label()} is outside layer {weight.layer}'s down_proj, which has "
                f"{rows} rows (d_model) and {cols} columns (d_mlp).\n"
                "List weights as [layer, row, col] with row < d_model and col < d_mlp."
            )


def _detected(ctx: StepContext, step_id: str) -> list[Target]:
    cases = ctx.outputs(step_id, SuperWeightsResult)
    same = [c for c in cases if c.model_name == ctx.model.name]
    if not same:
        models = sorted({c.model_name for c in cases})
        raise ResourceError(
            f"super_weight_vocab case {ctx.case_id}: step {step_id!r} ran on {models}, "
            f"not on {ctx.model.name!r}.\n"
            f"Run {step_id!r} on the same model, or list the weights: `weights: [[layer, row, col], ...]`."
        )
    targets: dict[SuperWeight, Target] = {}
    for case in same:
        for w in case.result.weights:
            weight = SuperWeight(w.layer, w.row, w.col)
            targets.setdefault(weight, Target(weight, w.model_dump(exclude_none=True)))
    if len(same) > 1:
        ctx.note(f"Step {step_id!r} has {len(same)} cases on {ctx.model.name}; their weights are pooled.")
    ordered = list(targets.values())
    if all("ppl_ratio" in t.detected for t in ordered):
        ordered.sort(key=lambda t: -float(t.detected["ppl_ratio"]))
    return ordered


def _cascade_layers(ctx: StepContext, params: SuperWeightVocabParams) -> list[int]:
    if not params.cascade:
        return []
    n_layers = ctx.model.n_layers
    if params.cascade_layers is None:
        return sorted({round(float(x)) for x in np.linspace(0, n_layers - 1, min(8, n_layers))})
    where = f"super_weight_vocab case {ctx.case_id}"
    layers = require_layers(
        params.cascade_layers, n_layers, model=ctx.model.name, where=where, field="cascade_layers"
    )
    return sorted(layers)


def _note_windows(ctx: StepContext, params: SuperWeightVocabParams, windows: Windows) -> None:
    if windows.unused:
        text_len = params.window_len - int(windows.bos)
        fits = text_len + (params.tokens - text_len) // params.stride * params.stride
        ctx.note(
            f"The last {windows.unused} of the {params.tokens} tokens fall outside every window; "
            f"tokens: {fits} tiles exactly with window_len {params.window_len} and stride {params.stride}."
        )


def _intervene(
    ctx: StepContext,
    params: SuperWeightVocabParams,
    windows: Windows,
    vocab: Vocabulary,
    stop_ids: torch.Tensor,
    cascade_layers: Sequence[int],
    base: Measured,
    target: Target,
    control: SuperWeight,
) -> dict[str, Any]:
    """The seed's super weight card: zeroed weight, random-coordinate and whole-neuron controls."""
    model = ctx.model.model
    weight = target.weight
    label = weight.label()
    with zeroed(model, [weight]):
        zero = measure(ctx, windows, params, stop_ids, cascade_layers, f"vocab: {label} zeroed")
    with zeroed(model, [control]):
        rand = measure(ctx, windows, params, stop_ids, (), f"vocab: random {control.label()}")
    with zeroed(model, [weight.neuron()]):
        neuron = measure(ctx, windows, params, stop_ids, (), f"vocab: neuron {weight.neuron().label()}")
    return {
        "model": ctx.model.name,
        "tensor": TENSOR,
        **weight.as_dict(),
        "value": weight.value(model),
        "baselines": base.means(),
        "deltas": deltas(zero, base),
        "controls": {
            "random_coord": {**control.as_dict(), "value": control.value(model)},
            "random_coord_delta": deltas(rand, base),
            "neuron_zero_delta": deltas(neuron, base),
        },
        "cascade": cascade_deltas(zero, base) if cascade_layers else None,
        "bootstrap": bootstrap_ci(zero, base, params.bootstrap, ctx.seed) if params.bootstrap else None,
        "token_prob_changes": prob_changes(zero, base, vocab, params.top_k),
        "detection": target.detected or None,
    }


def _summary(
    ctx: StepContext,
    params: SuperWeightVocabParams,
    windows: Windows,
    cards: list[dict[str, Any]],
    neuron_cards: list[dict[str, Any]],
    base: Measured | None,
) -> SuperWeightVocabResult:
    """What expectations read: ``weights[0].deltas.loss``, ``neurons[0].label``…"""
    summary = {
        "model": ctx.model.name,
        "n_weights": len(cards),
        "windows": {
            "n": len(windows.starts),
            "window_len": params.window_len,
            "stride": params.stride,
            "tokens": params.tokens,
            "bos": windows.bos,
            "drop_first_token": params.drop_first_token,
            "scored_positions": len(windows.starts) * windows.scored_per_window,
        },
        "baselines": base.means() if base else None,
        "weights": [
            {
                **{k: c[k] for k in ("layer", "row", "col", "value", "deltas")},
                "random_coord_delta": c["controls"]["random_coord_delta"],
                "neuron_zero_delta": c["controls"]["neuron_zero_delta"],
                "loss_ci": [c["bootstrap"]["loss"]["ci_2.5"], c["bootstrap"]["loss"]["ci_97.5"]]
                if c["bootstrap"]
                else None,
                "top_prob_up": [t["str"] for t in c["token_prob_changes"]["up"][:5]],
            }
            for c in cards
        ],
        "neurons": [
            {
                "layer": n["layer"],
                "neuron": n["neuron"],
                "label": n["label"],
                **{k: n["moments"][k] for k in ("var", "skew", "kurt")},
                "top_up": [t["str"] for t in n["top_tokens_up"][:5]],
                "top_down": [t["str"] for t in n["top_tokens_down"][:5]],
            }
            for n in neuron_cards
        ],
    }
    return SuperWeightVocabResult.model_validate(summary)


def _flat_weight(card: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {k: card[k] for k in ("model", "tensor", "layer", "row", "col", "value")}
    for prefix, values in (
        ("baseline", card["baselines"]),
        ("delta", card["deltas"]),
        ("random_delta", card["controls"]["random_coord_delta"]),
        ("neuron_delta", card["controls"]["neuron_zero_delta"]),
    ):
        row.update({f"{prefix}_{m}": values[m] for m in METRICS})
    for metric, ci in (card["bootstrap"] or {}).items():
        row[f"{metric}_ci_2.5"], row[f"{metric}_ci_97.5"] = ci["ci_2.5"], ci["ci_97.5"]
    return row


def _flat_neuron(card: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {k: card[k] for k in ("model", "layer", "neuron", "label")}
    row.update(card["moments"])
    if card["moments_cos"]:
        row.update({f"{k}_cos": v for k, v in card["moments_cos"].items()})
    row["top_up"] = " | ".join(t["str"] for t in card["top_tokens_up"][:10])
    row["top_down"] = " | ".join(t["str"] for t in card["top_tokens_down"][:10])
    if card["enrichment"]:
        row["top_class"], row["top_class_score"] = (
            card["enrichment"][0]["class"],
            card["enrichment"][0]["score"],
        )
    return row


def _data_files(
    params: SuperWeightVocabParams,
    windows: Windows,
    cards: list[dict[str, Any]],
    neuron_cards: list[dict[str, Any]],
    seconds: float,
) -> dict[str, Any]:
    return {
        "neurons.jsonl": neuron_cards,
        "super_weights.jsonl": cards,
        "neurons.csv": [_flat_neuron(c) for c in neuron_cards],
        "super_weights.csv": [_flat_weight(c) for c in cards],
        "run_config.json": {
            **params.model_dump(mode="json"),
            "window_starts": windows.starts,
            "bos": windows.bos,
            "seconds": seconds,
        },
    }


# --- plots -----------------------------------------------------------------------------------------------


def _plots(
    ctx: StepContext,
    cards: list[dict[str, Any]],
    neurons: dict[tuple[int, int], tuple[dict[str, Any], np.ndarray]],
) -> dict[str, Figure]:
    plots = {}
    for (layer, neuron), (card, effects) in neurons.items():
        plots[f"neurons/{layer}-{neuron}-effects.png"] = _effects_plot(ctx.model.name, card, effects)
    for card in cards:
        stem = f"super_weights/{card['tensor']}-L{card['layer']}-R{card['row']}-C{card['col']}"
        plots[f"{stem}-deltas.png"] = _deltas_plot(ctx.model.name, card)
        if card["cascade"]:
            plots[f"{stem}-cascade.png"] = _cascade_plot(ctx.model.name, card)
    return plots


def _effects_plot(model_name: str, card: dict[str, Any], effects: np.ndarray) -> Figure:
    """Distribution of the neuron's logit effects, and its most promoted / suppressed tokens."""
    fig = Figure(figsize=(11, 4), layout="constrained")
    hist, tokens = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.2]})
    counts, edges = np.histogram(effects, bins=80)
    hist.stairs(counts, edges, fill=True)
    hist.set(yscale="log", xlabel="direct logit effect per unit activation", ylabel="tokens")
    m = card["moments"]
    hist.set_title(
        f"var {m['var']:.3g} · skew {m['skew']:.3g} · kurt {m['kurt']:.3g} · {card['label']}", fontsize=9
    )
    shown = card["top_tokens_down"][:10][::-1] + card["top_tokens_up"][:10]
    shown = sorted(shown, key=lambda t: t["effect"])
    tokens.barh(
        range(len(shown)),
        [t["effect"] for t in shown],
        color=["tab:red" if t["effect"] < 0 else "tab:blue" for t in shown],
    )
    tokens.set_yticks(range(len(shown)), [repr(t["str"]) for t in shown], fontsize=7)
    tokens.set_xlabel("effect")
    fig.suptitle(f"{model_name} · layer {card['layer']} neuron {card['neuron']} · vocabulary effects")
    return fig


def _deltas_plot(model_name: str, card: dict[str, Any]) -> Figure:
    """Each metric's change: the weight zeroed, a random coordinate zeroed, the whole neuron zeroed."""
    fig = Figure(figsize=(11, 3.4), layout="constrained")
    axes = fig.subplots(1, len(METRICS))
    conditions = [
        ("super weight", card["deltas"], "tab:red"),
        ("random coord", card["controls"]["random_coord_delta"], "tab:blue"),
        ("whole neuron", card["controls"]["neuron_zero_delta"], "tab:purple"),
    ]
    for ax, metric in zip(axes, METRICS, strict=True):
        values = [c[1][metric] for c in conditions]
        ax.bar(range(3), values, color=[c[2] for c in conditions])
        if card["bootstrap"]:
            ci = card["bootstrap"][metric]
            ax.errorbar(
                [0],
                [values[0]],
                yerr=[[values[0] - ci["ci_2.5"]], [ci["ci_97.5"] - values[0]]],
                color="black",
                capsize=4,
            )
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(3), [c[0] for c in conditions], rotation=30, ha="right", fontsize=7)
        ax.set_title(f"Δ {metric} (base {card['baselines'][metric]:.3g})", fontsize=8)
    fig.suptitle(
        f"{model_name} · {card['tensor']} L{card['layer']} R{card['row']} C{card['col']} zeroed", fontsize=10
    )
    return fig


def _cascade_plot(model_name: str, card: dict[str, Any]) -> Figure:
    """Change in logit-lens entropy and margin by layer when the weight is zeroed."""
    cascade = card["cascade"]
    fig = Figure(figsize=(6.5, 3.6), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(cascade["layers"], cascade["delta_entropy"], marker="o", label="Δ entropy (nats)")
    ax.plot(cascade["layers"], cascade["delta_margin"], marker="s", label="Δ top-k margin")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.axvline(card["layer"], color="gray", linestyle="--", linewidth=1, label=f"layer {card['layer']}")
    ax.set(xlabel="layer (logit lens on resid_post)", ylabel="change when zeroed")
    ax.legend(fontsize=8)
    ax.set_title(f"{model_name} · L{card['layer']} R{card['row']} C{card['col']} · cascade", fontsize=10)
    return fig
