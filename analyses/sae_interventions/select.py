"""Which features ``sae_interventions`` edits, and the workload built from them.

Features come from the params (``explicit``), a CSV in the seed's format (``csv``), or the SAEs'
firing statistics over the dataset (``live``, ``top_frequency``, ``random``: one partial forward
pass per batch, up to the last SAE's layer).
"""

from __future__ import annotations

import numpy as np

from analyses._features_csv import read_features_csv
from analyses._lean_forward import checked_lean_forward
from analyses._sae_tensors import FeatureStats, Unembedding, eligible_positions, feature_stats
from analyses.sae_interventions import SaeInterventionsParams
from analyses.sae_interventions.workload import Workload
from runner.errors import ResourceError, RunnerError
from runner.saes.loading import LoadedSAE
from runner.step import StepContext

__all__ = ["build_workload", "select_features"]


def build_workload(
    ctx: StepContext, params: SaeInterventionsParams, saes: list[LoadedSAE], where: str
) -> Workload:
    """The case's interventions: alphas (with a note when some are ignored or added), features, the
    unembedding, and the lean forward when the fast path runs on it."""
    tokenizer = ctx.model.tokenizer
    bos = getattr(tokenizer, "bos_token_id", None)
    alphas = params.alphas()
    if params.mode == "ablate" and {"alpha", "alpha_sweep"} & params.model_fields_set:
        ctx.note("mode `ablate` sets features to 0; `alpha` and `alpha_sweep` are ignored.")
    elif params.alpha not in params.alpha_sweep and params.mode != "ablate":
        ctx.note(f"alpha {params.alpha:g} is not in alpha_sweep; it was measured too.")
    features, labels = select_features(ctx, params, saes, bos, where)
    model = ctx.model.model
    unembedding = Unembedding.of(model)
    lean = (
        checked_lean_forward(ctx, model, "The fast path runs TransformerLens' own blocks")
        if params.method == "fast" and params.forward == "lean"
        else None
    )
    return Workload(saes, features, labels, alphas, params.mode, params.exclude_bos, bos, unembedding, lean)


def select_features(
    ctx: StepContext, params: SaeInterventionsParams, saes: list[LoadedSAE], bos: int | None, where: str
) -> tuple[list[list[int]], list[list[str]]]:
    """Per SAE, the features to edit and their labels (empty but from a CSV)."""
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
    path = str(params.features_csv)
    table = read_features_csv(ctx, path, where)
    features, labels = [], []
    for loaded in saes:
        rows = table.get(loaded.layer, {})
        if not rows:
            raise ResourceError(
                f"{where}: {path} lists no feature for layer {loaded.layer} "
                f"(it lists layers {sorted(table)}).\n"
                f"Add rows for layer {loaded.layer}, or drop it from `layers`."
            )
        chosen = list(rows)
        _check_range(chosen, loaded, where, path)
        features.append(chosen)
        labels.append(list(rows.values()))
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
