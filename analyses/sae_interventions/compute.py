"""How ``sae_interventions`` computes; ``__init__.py`` declares it (params, result, registration)."""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from matplotlib.figure import Figure

from analyses._lean_forward import LeanForward
from analyses._sae_tensors import (
    PADDING,
    CleanReference,
    FeatureStats,
    RowComparison,
    Unembedding,
    capture,
    compare_rows,
    eligible_positions,
    feature_stats,
    logits_are_capped,
    logits_from_resid,
    shift_to_logits,
)
from analyses.sae_interventions import Mode, SaeInterventionsParams, SaeInterventionsResult
from runner.errors import ResourceError, RunnerError
from runner.hooks import hook_name, parse_hook
from runner.saes.loading import LoadedSAE
from runner.step import StepContext, StepOutput

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["run"]

FwdHooks = list[tuple[str | Callable[..., Any], Callable[..., Any]]]
METRIC_CHUNK_ELEMENTS = 1 << 25
"""Logit-sized tensors are processed in row chunks of at most this many elements (128 MB in float32)."""


@dataclass(frozen=True)
class PassSizing:
    """How the fast path packs rows into forward passes, per block forward (measured on SmolLM2-135M,
    2 CPU cores)."""

    batches: int
    """A pass runs up to this many batches' worth of tokens (``batch_size`` x ``max_len`` each)."""
    overhead_tokens: int
    """The fixed cost of one pass, in tokens run; the chunker trades it against padding."""


PASS_SIZING = {
    # A lean pass reads every weight of its blocks however few tokens it holds (as long as running
    # 60-70 tokens), and costs least per token between about 800 and 2000 tokens; past 3000 its
    # intermediate tensors outgrow the caches.
    "lean": PassSizing(batches=2, overhead_tokens=64),
    # TransformerLens copies its weight matrices on every call, as long as running 250-300 tokens;
    # fewer, larger passes suit it.
    "transformer_lens": PassSizing(batches=4, overhead_tokens=256),
}
MAX_PASS_ROWS = 512
"""Rows one fast-path pass may hold at most (bounds the chunker's search)."""


# ----------------------------------------------------------------------------------------------
# The workload: which (layer, feature, alpha) to run


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


# ----------------------------------------------------------------------------------------------
# Accumulated metrics


@dataclass
class Snippet:
    """A position where an intervention moved the prediction a lot."""

    kl: float
    delta_loss: float
    passage: int
    position: int
    clean_top: int
    clean_top_prob: float
    new_top: int
    new_top_prob: float
    target: int


@dataclass
class Totals:
    """Sums over every scored position, per intervention; means are taken at the end."""

    n: int
    width: int
    """Length of the summed shift vectors: d_model, or d_vocab when ``in_vocab_space``."""
    vocab: int
    in_vocab_space: bool
    """Whether shifts are logit changes (the loop; soft-capped logits) or changes of the unembedding's
    input (the fast path's d_model-sized comparisons)."""
    device: torch.device
    keep_snippets: int
    """Positions of largest KL kept per intervention."""
    delta_loss: torch.Tensor = field(init=False)
    kl: torch.Tensor = field(init=False)
    delta_loss_fire: torch.Tensor = field(init=False)
    kl_fire: torch.Tensor = field(init=False)
    changed_top1: torch.Tensor = field(init=False)
    logit_sum: torch.Tensor = field(init=False)
    """``(n, width)`` summed shifts (see :class:`CleanReference`); logit changes via ``shift_to_logits``."""
    logit_sum_fire: torch.Tensor = field(init=False)
    intervened: np.ndarray = field(init=False)
    snippets: list[list[tuple[float, int, Snippet]]] = field(init=False)

    def __post_init__(self) -> None:
        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=torch.float64, device=self.device)

        self.delta_loss, self.kl = zeros(self.n), zeros(self.n)
        self.delta_loss_fire, self.kl_fire = zeros(self.n), zeros(self.n)
        self.changed_top1 = zeros(self.n)
        self.logit_sum, self.logit_sum_fire = zeros(self.n, self.width), zeros(self.n, self.width)
        self.intervened = np.zeros(self.n, dtype=np.int64)
        self.snippets = [[] for _ in range(self.n)]


@dataclass
class FeatureCounts:
    """Per (layer, slot): positions and passages where the feature fires, over eligible positions."""

    fire_tokens: np.ndarray
    """``(n_layers, n_slots)`` positions where it fires."""
    fire_predicting: np.ndarray
    """``(n_layers, n_slots)`` predicting positions (all but a passage's last) where it fires."""
    fire_passages: np.ndarray
    """``(n_layers, n_slots)`` passages where it fires at least once."""
    eligible_tokens: int = 0


@dataclass
class Work:
    """What was computed, for the timing summary and the benchmark's FLOP floor."""

    clean_tokens: int = 0
    """Tokens of clean full forward passes."""
    block_token_layers: int = 0
    """Sum over intervention passes of tokens x transformer blocks run."""
    attention_pairs_layers: int = 0
    """Sum over intervention passes of (query, key) pairs x blocks (the attention's quadratic part)."""
    unembed_tokens: int = 0
    """Positions unembedded in intervention passes."""
    needed_block_token_layers: int = 0
    """The same as ``block_token_layers`` if every row started exactly at its first edited position."""
    needed_attention_pairs_layers: int = 0
    needed_unembed_tokens: int = 0
    rows_run: int = 0
    """(passage, layer, feature, alpha) rows computed by a forward pass."""
    rows_identity: int = 0
    """Rows skipped because the intervention is the identity (alpha = 1 under scale)."""
    rows_not_firing: int = 0
    """Rows skipped because the feature never fires in the passage (nothing is edited)."""
    forward_passes: int = 0
    seconds_clean: float = 0.0
    seconds_interventions: float = 0.0


@dataclass
class CleanBatch:
    """One batch of passages after the clean pass."""

    tokens: torch.Tensor
    """``(B, T)``."""
    first: int
    """Dataset index of the first passage."""
    clean: CleanReference
    """The clean predictions, for comparisons."""
    eligible: torch.Tensor
    """``(B, T)`` positions an SAE reads and may edit."""
    acts: dict[str, torch.Tensor]
    """Activations at each SAE's hook, ``(B, T, d)``."""
    feats: list[torch.Tensor]
    """Per SAE, the selected features' clean activations ``(B, T, n_slots)``, zero where not eligible."""
    starts: dict[int, torch.Tensor] = field(default_factory=dict)
    """Fast path: the residual stream entering block ``L`` ``(B, T, d)``, per start layer."""
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """Fast path: keys and values ``(B, T, n_kv_heads, d_head)`` per layer (keys after the rotary
    embedding for the lean forward, before it for TransformerLens' cache; see ``_key_hook``)."""
    clean_logits: torch.Tensor | None = None
    """Loop: the clean logits of the predicting positions ``(B, T-1, V)``."""

    @property
    def n_predicting(self) -> int:
        """Positions per passage that predict a next token."""
        return int(self.tokens.shape[1]) - 1


# ----------------------------------------------------------------------------------------------
# The analysis


def run(ctx: StepContext, params: SaeInterventionsParams) -> StepOutput:
    """Scale, clamp or ablate SAE features; Δloss, KL and logit changes per layer, feature and alpha."""
    started = time.perf_counter()
    where = f"sae_interventions case {ctx.case_id}"
    saes = ctx.saes(params.sae, layers=params.layers, site=params.hook, where=where)
    _check_dataset(ctx, where)
    workload = _workload(ctx, params, saes, where)
    result = _run_with_oom_retry(ctx, params, workload)
    result.work.seconds_clean = round(result.work.seconds_clean, 3)
    seconds = time.perf_counter() - started
    return _output(ctx, params, workload, result, seconds)


def _check_dataset(ctx: StepContext, where: str) -> None:
    if len(ctx.dataset) == 0 or ctx.dataset.max_len < 2:
        raise ResourceError(
            f"{where}: the dataset needs passages of at least 2 tokens (a next-token loss); it has "
            f"{len(ctx.dataset)} passages of {ctx.dataset.max_len}.\nRaise `dataset.max_len`."
        )


def _workload(
    ctx: StepContext, params: SaeInterventionsParams, saes: list[LoadedSAE], where: str
) -> Workload:
    tokenizer = ctx.model.tokenizer
    bos = getattr(tokenizer, "bos_token_id", None)
    alphas = params.alphas()
    if params.mode == "ablate" and {"alpha", "alpha_sweep"} & params.model_fields_set:
        ctx.note("mode `ablate` sets features to 0; `alpha` and `alpha_sweep` are ignored.")
    elif params.alpha not in params.alpha_sweep and params.mode != "ablate":
        ctx.note(f"alpha {params.alpha:g} is not in alpha_sweep; it was measured too.")
    features, labels = _select_features(ctx, params, saes, bos, where)
    model = ctx.model.model
    unembedding = Unembedding.of(model)
    lean = _lean_forward(ctx, model) if params.method == "fast" and params.forward == "lean" else None
    return Workload(saes, features, labels, alphas, params.mode, params.exclude_bos, bos, unembedding, lean)


def _lean_forward(ctx: StepContext, model: HookedTransformer) -> LeanForward | None:
    """The lean forward, checked once per run (``None``, with a note, where TransformerLens' blocks run)."""
    refusal = ctx.cached(("lean_forward_refusal", model), lambda: LeanForward.refusal(model))
    if refusal is not None:
        ctx.note(f"The fast path runs TransformerLens' own blocks, not the lean forward: {refusal}.")
        return None
    return LeanForward(model)


# ----------------------------------------------------------------------------------------------
# Feature selection


def _select_features(
    ctx: StepContext, params: SaeInterventionsParams, saes: list[LoadedSAE], bos: int | None, where: str
) -> tuple[list[list[int]], list[list[str]]]:
    source = params.chosen_source
    if source == "explicit":
        chosen = _explicit(params, saes, where)
        return chosen, [[""] * len(f) for f in chosen]
    if source == "csv":
        return _from_csv(ctx, params, saes, where)
    stats = _stats(ctx, params, saes, bos)
    picked = []
    for loaded, stat in zip(saes, stats, strict=True):
        picked.append(_pick(ctx, params, loaded, stat, source))
    return picked, [[""] * len(f) for f in picked]


def _check_range(features: list[int], loaded: LoadedSAE, where: str, origin: str) -> None:
    bad = [f for f in features if f >= loaded.d_sae]
    if bad:
        raise ResourceError(
            f"{where}: features {bad} ({origin}) do not exist in the SAE for layer {loaded.layer}, which has "
            f"{loaded.d_sae} features (0-{loaded.d_sae - 1}).\nChoose features below {loaded.d_sae}."
        )


def _explicit(params: SaeInterventionsParams, saes: list[LoadedSAE], where: str) -> list[list[int]]:
    chosen = []
    for loaded in saes:
        if isinstance(params.features, dict):
            if loaded.layer not in params.features:
                raise ResourceError(
                    f"{where}: `features` lists layers {sorted(params.features)}, not layer {loaded.layer}.\n"
                    f"Add `{loaded.layer}: [...]` to `features`, or drop layer {loaded.layer} from `layers`."
                )
            features = list(params.features[loaded.layer])
        else:
            features = list(params.features or ())
        _check_range(features, loaded, where, "`features`")
        chosen.append(features)
    return chosen


def _from_csv(
    ctx: StepContext, params: SaeInterventionsParams, saes: list[LoadedSAE], where: str
) -> tuple[list[list[int]], list[list[str]]]:
    import pandas as pd

    text = str(params.features_csv)
    path = Path(text) if Path(text).is_absolute() else ctx.spec_dir / text
    if not path.is_file():
        raise ResourceError(
            f"{where}: the features CSV {path} does not exist (`features_csv: {text}`, from the spec).\n"
            "Write it with a header `layer,feature,label` and one row per feature, e.g. from Neuronpedia "
            "(https://www.neuronpedia.org/gpt2-small/res-jb), or use `feature_source: live`."
        )
    try:
        table = pd.read_csv(path)
    except (ValueError, OSError) as exc:
        raise ResourceError(
            f"{where}: cannot read {path} as CSV ({exc}).\nUse columns layer,feature,label."
        ) from None
    missing = [c for c in ("layer", "feature") if c not in table.columns]
    if missing:
        raise ResourceError(
            f"{where}: {path} has no column {' or '.join(missing)} "
            f"(columns: {', '.join(map(str, table.columns))}).\n"
            "Use the header `layer,feature,label`."
        )
    features, labels = [], []
    for loaded in saes:
        rows = table[table["layer"] == loaded.layer]
        if rows.empty:
            raise ResourceError(
                f"{where}: {path} lists no feature for layer {loaded.layer} "
                f"(it lists layers {sorted(set(table['layer'].tolist()))}).\n"
                f"Add rows for layer {loaded.layer}, or drop it from `layers`."
            )
        chosen = [int(f) for f in rows["feature"]]
        _check_range(chosen, loaded, where, str(path))
        features.append(chosen)
        column = rows["label"] if "label" in table.columns else [""] * len(chosen)
        labels.append(["" if isinstance(v, float) and math.isnan(v) else str(v) for v in column])
    return features, labels


def _stats(
    ctx: StepContext, params: SaeInterventionsParams, saes: list[LoadedSAE], bos: int | None
) -> list[FeatureStats]:
    """One partial pass (up to the last SAE's layer) for the selection's firing statistics."""
    model = ctx.model.model
    dataset = ctx.dataset
    batches = ctx.progress(
        dataset.batches(params.batch_size), dataset.n_batches(params.batch_size), "feature statistics"
    )
    return feature_stats(model, batches, saes, lambda t: eligible_positions(t, bos, params.exclude_bos))


def _pick(
    ctx: StepContext, params: SaeInterventionsParams, loaded: LoadedSAE, stat: FeatureStats, source: str
) -> list[int]:
    counts = stat.counts.numpy()
    alive = np.flatnonzero(counts > 0)
    n = params.features_per_layer
    if alive.size == 0:
        raise RunnerError(
            f"No feature of the SAE for layer {loaded.layer} fires on the dataset "
            f"({stat.n_tokens} positions).\n"
            "Check that the SAE matches the model and hook, or list `features` explicitly."
        )
    if source == "top_frequency":
        order = np.lexsort((np.arange(counts.size), -counts))  # most frequent first, ties by index
        return [int(i) for i in order[:n]]
    rng = np.random.default_rng([ctx.seed, loaded.layer])
    pool = alive
    if source == "live":
        means = stat.mean()[alive]
        threshold = np.percentile(means, params.live_percentile)
        pool = alive[means >= threshold]
    if pool.size < n:
        ctx.note(f"layer {loaded.layer}: only {pool.size} {source} features; using all of them.")
    return sorted(int(i) for i in rng.choice(pool, size=min(n, pool.size), replace=False))


# ----------------------------------------------------------------------------------------------
# Running: OOM retry, batches, the two methods


@dataclass
class Result:
    """What the batch loop accumulated."""

    totals: Totals
    counts: FeatureCounts
    work: Work
    clean_loss_sum: float
    n_predicting: int
    batch_size: int


def _run_with_oom_retry(ctx: StepContext, params: SaeInterventionsParams, workload: Workload) -> Result:
    batch_size = params.batch_size
    while True:
        try:
            return _run(ctx, params, workload, batch_size)
        except torch.cuda.OutOfMemoryError:
            if batch_size == 1:
                raise RunnerError(
                    f"sae_interventions case {ctx.case_id}: CUDA ran out of memory even with batch_size 1.\n"
                    "Use fewer or shorter passages (`dataset.max_len`), a smaller model, or `device: cpu`."
                ) from None
            batch_size //= 2
            ctx.note(f"CUDA out of memory: retried the case with batch_size {batch_size}.")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def _run(ctx: StepContext, params: SaeInterventionsParams, workload: Workload, batch_size: int) -> Result:
    model = ctx.model.model
    dataset = ctx.dataset
    device = next(model.parameters()).device
    method = params.method
    if method == "fast" and model.cfg.positional_embedding_type not in ("standard", "rotary"):
        ctx.note(
            f"The fast path supports standard and rotary position embeddings, not "
            f"{model.cfg.positional_embedding_type!r}; used the loop."
        )
        method = "loop"
    n_slots = max(len(f) for f in workload.features)
    shape = (len(workload.saes), n_slots)
    counts = FeatureCounts(np.zeros(shape, np.int64), np.zeros(shape, np.int64), np.zeros(shape, np.int64))
    in_vocab = method == "loop" or logits_are_capped(model)
    totals = Totals(
        len(workload.interventions),
        model.cfg.d_vocab if in_vocab else model.cfg.d_model,
        model.cfg.d_vocab,
        in_vocab,
        device,
        params.snippets_per_intervention,
    )
    work = Work()
    clean_loss = 0.0
    first = 0
    batches = ctx.progress(dataset.batches(batch_size), dataset.n_batches(batch_size), f"batches ({method})")
    for tokens in batches:
        start = time.perf_counter()
        batch = _clean_batch(model, tokens.to(device), first, workload, fast=method == "fast")
        work.clean_tokens += tokens.numel()
        work.seconds_clean += time.perf_counter() - start
        clean_loss += _clean_loss(batch)
        _count_features(batch, workload, counts, totals)
        start = time.perf_counter()
        if method == "fast":
            sizing = PASS_SIZING["lean" if workload.lean is not None else "transformer_lens"]
            budget = sizing.batches * batch_size * tokens.shape[1]
            _fast_batch(model, batch, workload, totals, work, budget, sizing.overhead_tokens)
        else:
            _loop_batch(model, batch, workload, totals, work)
        work.seconds_interventions += time.perf_counter() - start
        first += tokens.shape[0]
    n_predicting = len(dataset) * (dataset.max_len - 1)
    return Result(totals, counts, work, clean_loss, n_predicting, batch_size)


def _entry(hook: str, n_layers: int) -> tuple[int, bool]:
    """Where an intervention pass starts, and whether the edit is applied by a hook inside that block.

    resid_pre L is block L's input; resid_post L is block L+1's input. Other sites sit inside block L:
    the pass starts at block L from its clean input and a hook adds the edit.
    """
    parsed = parse_hook(hook)
    assert parsed is not None
    layer, site = parsed
    if site == "resid_pre":
        return layer, False
    if site == "resid_post":
        return layer + 1, False
    return layer, True


def _start_input_hook(start: int, n_layers: int) -> str:
    """The hook holding block ``start``'s input (the last block's output when ``start == n_layers``)."""
    if start == n_layers:
        return hook_name("resid_post", n_layers - 1)
    return hook_name("resid_pre", start)


def _clean_batch(
    model: HookedTransformer, tokens: torch.Tensor, first: int, workload: Workload, *, fast: bool
) -> CleanBatch:
    """The clean forward pass of a batch: what both methods compare against (and the fast path reuses)."""
    n_layers = model.cfg.n_layers
    hooks = [loaded.hook_name for loaded in workload.saes]
    entries = {_entry(h, n_layers) for h in hooks}
    if fast:
        hooks += [_start_input_hook(start, n_layers) for start, _ in entries]
        first_start = min(start for start, _ in entries)
        for layer in range(first_start, n_layers):
            hooks += [_key_hook(workload, layer), f"blocks.{layer}.attn.hook_v"]
    acts, resid = capture(model, tokens, hooks, stop_at_layer=n_layers)
    assert resid is not None
    clean = CleanReference.of(model, resid, tokens, workload.unembedding)
    with torch.no_grad():
        eligible = workload.eligible(tokens)
        feats = []
        for loaded, features in zip(workload.saes, workload.features, strict=True):
            f = loaded.encode(acts[loaded.hook_name])[..., features]  # (B, T, n_slots)
            feats.append(f * eligible.unsqueeze(-1).to(f.dtype))
    batch = CleanBatch(
        tokens, first, clean, eligible, {h: acts[h] for h in hooks[: len(workload.saes)]}, feats
    )
    if not fast:
        with torch.no_grad():
            batch.clean_logits = logits_from_resid(model, resid[:, :-1])
    if fast:
        batch.starts = {start: acts[_start_input_hook(start, n_layers)] for start, _ in entries}
        batch.kv = {
            layer: (acts[_key_hook(workload, layer)], acts[f"blocks.{layer}.attn.hook_v"])
            for layer in range(min(start for start, _ in entries), n_layers)
        }
    return batch


def _key_hook(workload: Workload, layer: int) -> str:
    """Keys as the fast path's prefix takes them: rotated for the lean forward, as TransformerLens'
    key-value cache holds them (before rotation) otherwise."""
    return workload.lean.key_hook(layer) if workload.lean is not None else f"blocks.{layer}.attn.hook_k"


def _clean_loss(batch: CleanBatch) -> float:
    return float(batch.clean.loss.sum(dtype=torch.float64))


def _count_features(batch: CleanBatch, workload: Workload, counts: FeatureCounts, totals: Totals) -> None:
    """Firing counts per (layer, feature) and edited positions per intervention; no forward pass needed."""
    counts.eligible_tokens += int(batch.eligible.sum())
    for layer, f in enumerate(batch.feats):
        fires = f > 0  # (B, T, n_slots)
        n = fires.shape[-1]
        counts.fire_tokens[layer, :n] += fires.sum((0, 1)).cpu().numpy()
        counts.fire_predicting[layer, :n] += fires[:, :-1].sum((0, 1)).cpu().numpy()
        counts.fire_passages[layer, :n] += fires.any(1).sum(0).cpu().numpy()
    for iv in workload.interventions:
        totals.intervened[iv.index] += int(_changed(batch, workload, iv).sum())


def _changed(batch: CleanBatch, workload: Workload, iv: Intervention) -> torch.Tensor:
    """``(B, T)`` positions whose activation the intervention changes."""
    f = batch.feats[iv.layer][..., iv.slot]  # (B, T)
    return (workload.edited(f, iv.alpha) != f) & batch.eligible


def _loop_batch(
    model: HookedTransformer, batch: CleanBatch, workload: Workload, totals: Totals, work: Work
) -> None:
    """The seed's way: a full forward pass per intervention with the edit applied by a hook, and every
    metric computed over the vocabulary from the clean and the intervened logits.

    It shares no metric code with the fast path (whose comparisons are d_model-sized, see
    ``CleanReference``), so the benchmark's comparison of the two checks that algebra too.
    """
    n_layers, (n_passages, length) = model.cfg.n_layers, batch.tokens.shape
    passages = torch.arange(n_passages, device=batch.tokens.device)
    assert batch.clean_logits is not None
    for iv in workload.interventions:
        loaded = workload.saes[iv.layer]
        edit = _loop_edit(loaded, iv, workload, batch.eligible)
        with torch.no_grad():
            logits = model.run_with_hooks(
                batch.tokens, return_type="logits", padding_side=PADDING, fwd_hooks=[(loaded.hook_name, edit)]
            )
        work.forward_passes += 1
        work.rows_run += n_passages
        work.block_token_layers += n_passages * length * n_layers
        work.attention_pairs_layers += n_passages * length * (length + 1) // 2 * n_layers
        work.unembed_tokens += n_passages * (length - 1)
        step = max(1, METRIC_CHUNK_ELEMENTS // ((length - 1) * totals.vocab))
        for lo in range(0, n_passages, step):
            chunk = passages[lo : lo + step]
            with torch.no_grad():
                rows = _vocab_comparison(
                    logits[chunk, :-1], batch.clean_logits[chunk], batch.tokens[chunk, 1:]
                )
            _accumulate(rows, batch, chunk, [iv] * len(chunk), 0, totals)


def _vocab_comparison(
    logits: torch.Tensor, clean_logits: torch.Tensor, targets: torch.Tensor
) -> RowComparison:
    """The metrics of intervened ``logits`` against ``clean_logits`` (both ``(R, P, V)``) straight from
    their definitions: Δloss = CE(q) - CE(p), KL(p ‖ q) = Σ_v p_v (log p_v - log q_v), logit changes."""
    logp = torch.log_softmax(clean_logits.float(), dim=-1)
    logq = torch.log_softmax(logits.float(), dim=-1)
    target = targets.unsqueeze(-1)
    delta_loss = (logp.gather(-1, target) - logq.gather(-1, target)).squeeze(-1).double()
    kl = (logp.exp() * (logp - logq)).sum(-1).double()  # float32 over V, as the fast path
    new_top_logp, new_top = logq.max(-1)
    return RowComparison(delta_loss, kl, new_top, new_top_logp.exp(), logits.float() - clean_logits.float())


def _loop_edit(
    loaded: LoadedSAE, iv: Intervention, workload: Workload, eligible: torch.Tensor
) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """The loop's hook: encode the activation, edit one feature, keep the reconstruction error."""
    features = torch.full((eligible.shape[0],), iv.feature, device=eligible.device)

    def edit(act: torch.Tensor, hook: Any) -> torch.Tensor:
        f = loaded.encode(act)[..., iv.feature] * eligible  # (B, T)
        return act + feature_delta(loaded, act, f, workload.edited(f, iv.alpha) * eligible, features)

    return edit


@dataclass(frozen=True)
class _Row:
    """One (passage, intervention) the fast path must run, from position ``t0`` on."""

    start: int
    t0: int
    passage: int
    iv: Intervention


def _fast_batch(
    model: HookedTransformer,
    batch: CleanBatch,
    workload: Workload,
    totals: Totals,
    work: Work,
    budget: int,
    overhead: int,
) -> None:
    """The fast path: skip what cannot change, run the rest from the hook and the first edited position."""
    n_layers, length = model.cfg.n_layers, int(batch.tokens.shape[1])
    rows: list[_Row] = []
    for iv in workload.interventions:
        if workload.is_identity(iv):
            work.rows_identity += batch.tokens.shape[0]
            continue
        changed = _changed(batch, workload, iv)  # (B, T)
        fired = changed.any(1)
        t0 = changed.to(torch.int8).argmax(1)  # (B,) first changed position
        start = _entry(workload.saes[iv.layer].hook_name, n_layers)[0]
        work.rows_not_firing += int((~fired).sum())
        rows += [_Row(start, int(t0[b]), b, iv) for b in torch.nonzero(fired).flatten().tolist()]
    rows.sort(key=lambda r: (r.start, r.t0, r.iv.index, r.passage))
    for chunk in _chunks(rows, length, budget, overhead):
        _run_chunk(model, batch, workload, chunk, totals, work)


def _chunks(rows: list[_Row], length: int, budget: int, overhead: int) -> list[list[_Row]]:
    """Split rows sorted by (start block, t0) into forward passes of least total cost.

    A pass runs every row of it from the pass's smallest t0, so a row with a later t0 pays for
    positions that are still clean (padding); every pass also pays a fixed cost of ``overhead``
    tokens (:class:`PassSizing`). Within each start block the rows are split into consecutive runs
    by dynamic programming: cost(run) = overhead + rows x (length - first t0), at most ``budget``
    tokens a pass.
    """
    chunks: list[list[_Row]] = []
    for _, same_start in itertools.groupby(rows, key=lambda r: r.start):
        group = list(same_start)
        span = np.array([length - r.t0 for r in group], dtype=np.int64)  # tokens run from each t0
        chunks += [group[a:b] for a, b in itertools.pairwise(_cheapest_cuts(span, budget, overhead))]
    return chunks


def _cheapest_cuts(span: np.ndarray, budget: int, overhead: int) -> list[int]:
    """Boundaries ``0 = c0 < c1 < ... = n`` minimizing sum(overhead + (c_{k+1} - c_k) * span[c_k])
    with ``(c_{k+1} - c_k) * span[c_k] <= budget`` (a single row is always allowed).

    ``span`` is non-increasing (rows sorted by t0), so a run's first row has its longest span.
    """
    n = len(span)
    best = np.zeros(n + 1)
    back = np.zeros(n + 1, dtype=np.int64)
    for i in range(1, n + 1):
        j = np.arange(max(0, i - MAX_PASS_ROWS), i)  # candidate first rows of the last run
        cost = best[j] + overhead + (i - j) * span[j]
        cost[((i - j) * span[j] > budget) & (j < i - 1)] = np.inf
        k = int(np.argmin(cost))
        best[i], back[i] = cost[k], j[k]
    cuts = [n]
    while cuts[-1] > 0:
        cuts.append(int(back[cuts[-1]]))
    return cuts[::-1]


def _run_chunk(
    model: HookedTransformer,
    batch: CleanBatch,
    workload: Workload,
    chunk: list[_Row],
    totals: Totals,
    work: Work,
) -> None:
    n_layers, length = model.cfg.n_layers, int(batch.tokens.shape[1])
    start, s = chunk[0].start, chunk[0].t0  # rows are sorted: s is the smallest t0
    loaded = workload.saes[chunk[0].iv.layer]
    device = batch.tokens.device
    passages = torch.tensor([r.passage for r in chunk], device=device)
    features = torch.tensor([r.iv.feature for r in chunk], device=device)
    slots = torch.tensor([r.iv.slot for r in chunk], device=device)
    x = batch.acts[loaded.hook_name][passages, s:]  # (R, T-s, d)
    f = batch.feats[chunk[0].iv.layer][passages, s:].gather(
        -1, slots.view(-1, 1, 1).expand(-1, length - s, 1)
    )
    f = f.squeeze(-1)  # (R, T-s)
    eligible = batch.eligible[passages, s:]
    new = torch.stack([workload.edited(f[i], r.iv.alpha) for i, r in enumerate(chunk)]) * eligible
    delta = feature_delta(loaded, x, f, new, features)  # (R, T-s, d)
    in_block = _entry(loaded.hook_name, n_layers)[1]
    resid_in = batch.starts[start][passages, s:] if in_block else x + delta
    hooks: FwdHooks = [(loaded.hook_name, lambda act, hook: act + delta)] if in_block else []
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        if workload.lean is not None:
            prefix = [(k[passages, :s], v[passages, :s]) for k, v in _kv_from(batch, start)] if s else None
            resid = workload.lean.run(resid_in, start, n_layers, prefix)
        else:
            cache = _prefix_cache(model, batch, passages, s, start) if s > 0 else None
            resid = model(resid_in, start_at_layer=start, stop_at_layer=n_layers, past_kv_cache=cache)
    rows, blocks = len(chunk), n_layers - start
    work.forward_passes += 1
    work.rows_run += rows
    work.block_token_layers += rows * (length - s) * blocks
    work.attention_pairs_layers += rows * _pairs(s, length) * blocks
    work.unembed_tokens += rows * (length - 1 - s)
    work.needed_block_token_layers += sum(length - r.t0 for r in chunk) * blocks
    work.needed_attention_pairs_layers += sum(_pairs(r.t0, length) for r in chunk) * blocks
    work.needed_unembed_tokens += sum(length - 1 - r.t0 for r in chunk)
    _score(model, resid, batch, passages, [r.iv for r in chunk], s, totals)


def _kv_from(batch: CleanBatch, start: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The clean keys and values ``(B, T, n_kv_heads, d_head)`` of blocks ``start`` on."""
    return [batch.kv[layer] for layer in sorted(batch.kv) if layer >= start]


def _pairs(s: int, length: int) -> int:
    """Causal (query, key) pairs of queries ``s..length-1``."""
    return sum(range(s + 1, length + 1))


def _prefix_cache(
    model: HookedTransformer, batch: CleanBatch, passages: torch.Tensor, s: int, start: int
) -> Any:
    """A frozen key-value cache: the clean keys and values of positions ``< s``, from block ``start`` on."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

    cache = TransformerLensKeyValueCache.init_cache(model.cfg, batch.tokens.device, len(passages))
    for layer in range(start, model.cfg.n_layers):
        keys, values = batch.kv[layer]
        cache.entries[layer] = TransformerLensKeyValueCacheEntry(
            keys[passages, :s], values[passages, :s], frozen=True
        )
    cache.freeze()
    return cache


# ----------------------------------------------------------------------------------------------
# Scoring: one code path for both methods


def _score(
    model: HookedTransformer,
    resid: torch.Tensor,
    batch: CleanBatch,
    passages: torch.Tensor,
    ivs: list[Intervention],
    s: int,
    totals: Totals,
) -> None:
    """Add the metrics of rows ``(passage, intervention)`` whose final residual ``resid`` ``(R, T-s, d)``
    starts at position ``s``; positions before ``s`` are unchanged and add exactly zero."""
    n_pred = batch.n_predicting - s
    if n_pred <= 0:
        return
    step = max(1, METRIC_CHUNK_ELEMENTS // (n_pred * totals.vocab))
    for lo in range(0, len(ivs), step):
        hi = min(lo + step, len(ivs))
        with torch.no_grad():
            rows = compare_rows(model, resid[lo:hi, :n_pred], batch.clean, passages[lo:hi], s)
            _accumulate(rows, batch, passages[lo:hi], ivs[lo:hi], s, totals)


def _accumulate(
    rows: RowComparison,
    batch: CleanBatch,
    passages: torch.Tensor,
    ivs: list[Intervention],
    s: int,
    totals: Totals,
) -> None:
    """Add compared rows ``(R, P)`` (predicting positions ``s .. s+P-1``) to their interventions' sums."""
    stop = s + rows.kl.shape[1]
    fires = torch.stack(
        [batch.feats[iv.layer][p, s:stop, iv.slot] for iv, p in zip(ivs, passages.tolist(), strict=True)]
    )
    fires = (fires > 0).to(torch.float64)  # (R, P)
    changed = rows.new_top != batch.clean.top[passages, s:stop]
    index = torch.tensor([iv.index for iv in ivs], device=rows.kl.device)
    totals.delta_loss.index_add_(0, index, rows.delta_loss.sum(1))
    totals.kl.index_add_(0, index, rows.kl.sum(1))
    totals.delta_loss_fire.index_add_(0, index, (rows.delta_loss * fires).sum(1))
    totals.kl_fire.index_add_(0, index, (rows.kl * fires).sum(1))
    totals.changed_top1.index_add_(0, index, changed.sum(1).double())
    shift = rows.shift.double()  # (R, P, K)
    totals.logit_sum.index_add_(0, index, shift.sum(1))
    totals.logit_sum_fire.index_add_(0, index, torch.einsum("rp,rpk->rk", fires, shift))
    if totals.keep_snippets:
        _keep_snippets(totals, ivs, passages, s, batch, rows)


def _keep_snippets(
    totals: Totals,
    ivs: list[Intervention],
    passages: torch.Tensor,
    s: int,
    batch: CleanBatch,
    rows: RowComparison,
) -> None:
    """Keep the positions of largest KL per intervention (a bounded heap each)."""
    keep = totals.keep_snippets
    values, where = rows.kl.topk(min(keep, rows.kl.shape[1]), dim=1)  # (R, k)
    for r, iv in enumerate(ivs):
        heap = totals.snippets[iv.index]
        p = int(passages[r])
        for value, pos in zip(values[r].tolist(), where[r].tolist(), strict=True):
            if value <= 0 or (len(heap) == keep and value <= heap[0][0]):
                continue
            t = s + pos
            snippet = Snippet(
                kl=value,
                delta_loss=float(rows.delta_loss[r, pos]),
                passage=batch.first + p,
                position=t,
                clean_top=int(batch.clean.top[p, t]),
                clean_top_prob=float(batch.clean.top_prob[p, t]),
                new_top=int(rows.new_top[r, pos]),
                new_top_prob=float(rows.new_top_prob[r, pos]),
                target=int(batch.clean.targets[p, t]),
            )
            item = (value, -(batch.first + p) * 100_000 - t, snippet)  # ties: earlier first
            if len(heap) < keep:
                heapq.heappush(heap, item)
            else:
                heapq.heapreplace(heap, item)


# ----------------------------------------------------------------------------------------------
# Output: tables, summary, snippets, plots


def _output(
    ctx: StepContext, params: SaeInterventionsParams, workload: Workload, result: Result, seconds: float
) -> StepOutput:
    tokenizer = ctx.model.tokenizer
    rows = _feature_rows(ctx.model.model, workload, result, params.top_k_tokens, tokenizer)
    layer_rows = _layer_rows(workload, rows)
    snippets = _snippet_rows(workload, result, ctx.dataset.tokens, tokenizer, params.snippet_context)
    data: dict[str, Any] = {
        "per_feature_metrics.csv": [_flat(row) for row in rows],
        "per_feature_metrics.jsonl": rows,
        "per_layer_summary.csv": layer_rows,
        "features.csv": _features_table(workload, result),
        "snippets.jsonl": snippets,
        "snippets.md": _snippets_text(workload, snippets, params.alpha),
        "timing.json": _timing(result, seconds, params),
    }
    plots = _plots(ctx.model.name, workload, rows, params.alpha)
    summary = _summary(ctx, params, workload, result, rows, seconds)
    summary["features_at_alpha"] = _headline_rows(rows, summary["alpha"])
    summary["examples"] = _examples(snippets, summary["alpha"])
    return StepOutput(result=SaeInterventionsResult.model_validate(summary), data=data, plots=plots)


def _headline_rows(rows: list[dict[str, Any]], alpha: float) -> list[dict[str, Any]]:
    """The per-feature table of the report: the headline alpha, five tokens each way."""
    keys = ("layer", "feature", "label", "delta_loss", "kl", "delta_loss_where_fires", "firing_fraction")
    return [
        {
            **{k: row[k] for k in keys},
            "tokens_affected": row["tokens_affected"],
            "promoted": [t["token"] for t in row["top_promoted"][:5]],
            "suppressed": [t["token"] for t in row["top_suppressed"][:5]],
        }
        for row in rows
        if row["alpha"] == alpha
    ]


def _examples(snippets: list[dict[str, Any]], alpha: float, n: int = 8) -> list[dict[str, Any]]:
    """The snippets of largest KL at the headline alpha, at most one per (layer, feature)."""
    seen: set[tuple[int, int]] = set()
    out: list[dict[str, Any]] = []
    for snip in sorted((s for s in snippets if s["alpha"] == alpha), key=lambda s: -s["kl"]):
        if (snip["layer"], snip["feature"]) not in seen and len(out) < n:
            seen.add((snip["layer"], snip["feature"]))
            out.append({**snip, "context": " ".join(snip["context"].split())[-160:]})
    return out


def _token_text(tokenizer: Any, token: int) -> str:
    return str(tokenizer.decode([token]))


def _top_tokens(values: torch.Tensor, k: int, tokenizer: Any, largest: bool) -> list[dict[str, Any]]:
    top = values.topk(min(k, values.numel()), largest=largest)
    return [
        {"token": _token_text(tokenizer, int(i)), "id": int(i), "logit_delta": float(v)}
        for v, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
    ]


def _feature_rows(
    model: HookedTransformer, workload: Workload, result: Result, k: int, tokenizer: Any
) -> list[dict[str, Any]]:
    """One row per (layer, feature, alpha), with the means the seed reports."""
    totals, counts, n = result.totals, result.counts, result.n_predicting
    logit_sums = shift_to_logits(model, totals.logit_sum, totals.in_vocab_space)  # (n_interventions, V)
    logit_sums_fire = shift_to_logits(model, totals.logit_sum_fire, totals.in_vocab_space)
    rows = []
    for iv in workload.interventions:
        loaded = workload.saes[iv.layer]
        fire_pred = int(counts.fire_predicting[iv.layer, iv.slot])
        mean_delta = logit_sums[iv.index] / n  # (V,)
        fire_delta = logit_sums_fire[iv.index] / max(fire_pred, 1)
        rows.append(
            {
                "layer": loaded.layer,
                "hook": loaded.hook_name,
                "sae_hook": loaded.sae_hook,
                "feature": iv.feature,
                "label": workload.labels[iv.layer][iv.slot],
                "mode": workload.mode,
                "alpha": iv.alpha,
                "delta_loss": float(totals.delta_loss[iv.index]) / n,
                "kl": float(totals.kl[iv.index]) / n,
                "delta_loss_where_fires": float(totals.delta_loss_fire[iv.index]) / fire_pred
                if fire_pred
                else None,
                "kl_where_fires": float(totals.kl_fire[iv.index]) / fire_pred if fire_pred else None,
                "firing_fraction": int(counts.fire_tokens[iv.layer, iv.slot])
                / max(counts.eligible_tokens, 1),
                "passages_with_feature": int(counts.fire_passages[iv.layer, iv.slot]),
                "tokens_intervened": int(totals.intervened[iv.index]),
                "tokens_affected": int(totals.changed_top1[iv.index]),
                "fraction_affected": float(totals.changed_top1[iv.index]) / n,
                "top_promoted": _top_tokens(mean_delta, k, tokenizer, largest=True),
                "top_suppressed": _top_tokens(mean_delta, k, tokenizer, largest=False),
                "top_promoted_where_fires": _top_tokens(fire_delta, k, tokenizer, largest=True)
                if fire_pred
                else [],
                "top_suppressed_where_fires": _top_tokens(fire_delta, k, tokenizer, largest=False)
                if fire_pred
                else [],
            }
        )
    return rows


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    """A CSV row: token lists become ``'tok' (+1.23); ...`` strings."""

    def text(tokens: list[dict[str, Any]]) -> str:
        return "; ".join(f"{t['token']!r} ({t['logit_delta']:+.4g})" for t in tokens)

    return {key: text(value) if isinstance(value, list) else value for key, value in row.items()}


def _layer_rows(workload: Workload, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (layer, alpha): means and extremes over the layer's features."""
    out = []
    for loaded in workload.saes:
        for alpha in workload.alphas:
            group = [r for r in rows if r["layer"] == loaded.layer and r["alpha"] == alpha]
            strongest = max(group, key=lambda r: abs(r["delta_loss"]))
            out.append(
                {
                    "layer": loaded.layer,
                    "hook": loaded.hook_name,
                    "alpha": alpha,
                    "n_features": len(group),
                    "mean_delta_loss": float(np.mean([r["delta_loss"] for r in group])),
                    "max_delta_loss": max(r["delta_loss"] for r in group),
                    "min_delta_loss": min(r["delta_loss"] for r in group),
                    "mean_kl": float(np.mean([r["kl"] for r in group])),
                    "max_kl": max(r["kl"] for r in group),
                    "strongest_feature": strongest["feature"],
                    "mean_firing_fraction": float(np.mean([r["firing_fraction"] for r in group])),
                    "mean_fraction_affected": float(np.mean([r["fraction_affected"] for r in group])),
                }
            )
    return out


def _features_table(workload: Workload, result: Result) -> list[dict[str, Any]]:
    """The features used, in the seed's CSV format (layer, feature, label) so a spec can reuse them."""
    counts = result.counts
    return [
        {
            "layer": loaded.layer,
            "feature": feature,
            "label": workload.labels[i][slot],
            "firing_fraction": int(counts.fire_tokens[i, slot]) / max(counts.eligible_tokens, 1),
            "passages_with_feature": int(counts.fire_passages[i, slot]),
        }
        for i, (loaded, features) in enumerate(zip(workload.saes, workload.features, strict=True))
        for slot, feature in enumerate(features)
    ]


def _snippet_rows(
    workload: Workload, result: Result, tokens: torch.Tensor, tokenizer: Any, context: int
) -> list[dict[str, Any]]:
    out = []
    for iv in workload.interventions:
        for _, _, snip in sorted(result.totals.snippets[iv.index], key=lambda item: (-item[0], -item[1])):
            passage = tokens[snip.passage]
            before = passage[max(0, snip.position + 1 - context) : snip.position + 1].tolist()
            out.append(
                {
                    "layer": workload.saes[iv.layer].layer,
                    "feature": iv.feature,
                    "alpha": iv.alpha,
                    "passage": snip.passage,
                    "position": snip.position,
                    "kl": snip.kl,
                    "delta_loss": snip.delta_loss,
                    "context": tokenizer.decode(before),
                    "next_token": _token_text(tokenizer, snip.target),
                    "clean_top": _token_text(tokenizer, snip.clean_top),
                    "clean_top_prob": snip.clean_top_prob,
                    "intervened_top": _token_text(tokenizer, snip.new_top),
                    "intervened_top_prob": snip.new_top_prob,
                }
            )
    return out


def _snippets_text(workload: Workload, snippets: list[dict[str, Any]], alpha: float) -> str:
    """Markdown: per (layer, feature), the largest changes of prediction at the headline alpha."""
    shown = alpha if workload.mode != "ablate" else 0.0
    lines = [f"# Largest changes in prediction ({workload.mode}, alpha {shown:g})", ""]
    for snip in snippets:
        if snip["alpha"] != shown:
            continue
        context = " ".join(snip["context"].split())
        lines += [
            f"## layer {snip['layer']} feature {snip['feature']} · passage {snip['passage']} position "
            f"{snip['position']} · KL {snip['kl']:.4g} · Δloss {snip['delta_loss']:+.4g}",
            "",
            f"> …{context} ⟦{snip['next_token']!r}⟧",
            "",
            f"clean top prediction {snip['clean_top']!r} (p={snip['clean_top_prob']:.3f}) → intervened "
            f"{snip['intervened_top']!r} (p={snip['intervened_top_prob']:.3f})",
            "",
        ]
    return "\n".join(lines)


def _timing(result: Result, seconds: float, params: SaeInterventionsParams) -> dict[str, Any]:
    work = result.work
    return {
        "method": params.method,
        "batch_size": result.batch_size,
        "total_seconds": round(seconds, 3),
        **{name: getattr(work, name) for name in work.__dataclass_fields__},
    }


def _summary(
    ctx: StepContext,
    params: SaeInterventionsParams,
    workload: Workload,
    result: Result,
    rows: list[dict[str, Any]],
    seconds: float,
) -> dict[str, Any]:
    """What expectations read: ``layers[6].delta_loss``, ``top_effect.delta_loss``, ``identity_max_abs``…"""
    headline = params.alpha if workload.mode != "ablate" else 0.0
    layers: dict[int, Any] = {}
    for i, loaded in enumerate(workload.saes):
        mine = [r for r in rows if r["layer"] == loaded.layer]
        at = [r for r in mine if r["alpha"] == headline]
        layers[loaded.layer] = {
            "hook": loaded.hook_name,
            "sae_hook": loaded.sae_hook,
            "sae": loaded.info,
            "features": workload.features[i],
            "delta_loss": float(np.mean([r["delta_loss"] for r in at])),
            "kl": float(np.mean([r["kl"] for r in at])),
            "delta_loss_by_alpha": [
                float(np.mean([r["delta_loss"] for r in mine if r["alpha"] == a])) for a in workload.alphas
            ],
            "kl_by_alpha": [
                float(np.mean([r["kl"] for r in mine if r["alpha"] == a])) for a in workload.alphas
            ],
        }
    identity = [r for r in rows if workload.mode == "scale" and r["alpha"] == 1.0]
    top = max((r for r in rows if r["alpha"] == headline), key=lambda r: abs(r["delta_loss"]))
    work = result.work
    return {
        "model": ctx.model.name,
        "mode": workload.mode,
        "method": params.method,
        "forward": None if params.method == "loop" else "lean" if workload.lean else "transformer_lens",
        "alpha": headline,
        "alphas": list(workload.alphas),
        "feature_source": params.chosen_source,
        "n_passages": len(ctx.dataset),
        "n_tokens": result.n_predicting,
        "clean_loss": result.clean_loss_sum / result.n_predicting,
        "layers": layers,
        "top_effect": {k: top[k] for k in ("layer", "feature", "alpha", "delta_loss", "kl", "label")},
        "identity_max_abs": max((max(abs(r["delta_loss"]), abs(r["kl"])) for r in identity), default=None),
        "rows": {"run": work.rows_run, "identity": work.rows_identity, "not_firing": work.rows_not_firing},
        "seconds": round(seconds, 3),
    }


def _plots(model: str, workload: Workload, rows: list[dict[str, Any]], alpha: float) -> dict[str, Figure]:
    headline = alpha if workload.mode != "ablate" else 0.0
    plots = {f"layer_vs_dloss_alpha{headline:g}.png": _layer_plot(model, workload, rows, headline)}
    if len(workload.alphas) > 1:
        plots["alpha_response_dloss.png"] = _alpha_plot(
            model, workload, rows, "delta_loss", "Δ loss (nats/token)"
        )
        plots["alpha_response_kl.png"] = _alpha_plot(model, workload, rows, "kl", "KL(clean ‖ intervened)")
    return plots


def _layer_plot(model: str, workload: Workload, rows: list[dict[str, Any]], alpha: float) -> Figure:
    fig = Figure(figsize=(7, 3.8), layout="constrained")
    ax = fig.add_subplot()
    at = [r for r in rows if r["alpha"] == alpha]
    ax.scatter([r["layer"] for r in at], [r["delta_loss"] for r in at], s=14, alpha=0.6, label="one feature")
    layers = [loaded.layer for loaded in workload.saes]
    means = [float(np.mean([r["delta_loss"] for r in at if r["layer"] == layer])) for layer in layers]
    ax.plot(layers, means, marker="o", color="tab:red", label="mean over features")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set(
        title=f"{model} · {workload.mode} alpha {alpha:g} · Δ loss per layer",
        xlabel="layer",
        ylabel="Δ loss vs clean (nats/token)",
    )
    ax.legend(fontsize=8)
    return fig


def _alpha_plot(model: str, workload: Workload, rows: list[dict[str, Any]], key: str, label: str) -> Figure:
    n = len(workload.saes)
    cols = min(4, n)
    fig = Figure(figsize=(3.6 * cols, 2.9 * -(-n // cols) + 0.5), layout="constrained")
    fig.suptitle(f"{model} · {workload.mode} · {label} against alpha")
    for i, loaded in enumerate(workload.saes):
        ax = fig.add_subplot(-(-n // cols), cols, i + 1)
        for feature in workload.features[i]:
            mine = [r for r in rows if r["layer"] == loaded.layer and r["feature"] == feature]
            ax.plot([r["alpha"] for r in mine], [r[key] for r in mine], marker=".", label=str(feature))
        ax.set_title(f"layer {loaded.layer} ({loaded.site})", fontsize=9)
        ax.set_xlabel("alpha", fontsize=8)
        ax.tick_params(labelsize=7)
        if len(workload.features[i]) <= 8:
            ax.legend(title="feature", fontsize=6, title_fontsize=6)
    return fig
