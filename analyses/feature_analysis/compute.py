"""How ``feature_analysis`` computes; ``__init__.py`` declares it.

:func:`run`: load the SAEs, pick the features, one pass over the dataset (:func:`accumulate`: the
model up to the last SAE's layer, each SAE's encode, each accumulator's update), the logit effects,
then ``outputs`` builds the files, cards and result.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from analyses._features import FeatureAccumulator, FeatureTable, LogitEffects, logit_effects
from analyses._features_csv import read_features_csv
from analyses._features_saes import load_feature_saes
from analyses._sae_tensors import capture, stop_layer
from analyses.feature_analysis import FeatureAnalysisParams
from runner.errors import ResourceError
from runner.saes.loading import LoadedSAE
from runner.step import StepContext, StepOutput

__all__ = ["Analysed", "accumulate", "eligible_mask", "run"]


@dataclass
class Analysed:
    """One SAE's analysed features and what was computed about them."""

    loaded: LoadedSAE
    feature_ids: torch.Tensor
    labels: dict[int, str]
    accumulator: FeatureAccumulator
    table: FeatureTable | None = None
    effects: LogitEffects | None = None
    timing: dict[str, float] = field(default_factory=dict)
    correlate: torch.Tensor | None = None
    """``(C,)`` rows (in ``feature_ids``) of the features whose correlations are accumulated."""
    sum_xy: torch.Tensor | None = None
    """``(C, F)`` float64 sums over counted positions of their activation times every feature's."""

    def add_products(self, acts: torch.Tensor, eligible: torch.Tensor) -> None:
        """Add ``(B, T, F)`` activations (zero where not counted) to :attr:`sum_xy`."""
        if self.correlate is None or self.sum_xy is None:
            return
        flat = acts[eligible].double()  # (n, F) counted positions only
        self.sum_xy += flat[:, self.correlate].T @ flat  # (C, F)

    def correlations(self, k: int) -> dict[int, list[dict[str, float]]]:
        """Row → its ``k`` most correlated other features ``[{feature, pearson}]``, largest first
        (features that never fire have no correlation and are left out)."""
        table = self.table
        if self.correlate is None or self.sum_xy is None or table is None or table.n_tokens == 0:
            return {}
        n = table.n_tokens
        mean = torch.from_numpy(table.sum) / n  # (F,) float64, zeros counted
        std = (torch.from_numpy(table.sum_sq) / n - mean**2).clamp(min=0).sqrt()
        rows = self.correlate
        cov = self.sum_xy / n - mean[rows, None] * mean[None, :]  # (C, F)
        pearson = cov / (std[rows, None] * std[None, :])
        pearson[torch.arange(len(rows)), rows] = float("nan")  # not itself
        pearson = pearson.nan_to_num(nan=-2.0)  # NaN (a dead feature, itself) never chosen
        values, index = pearson.topk(min(k, pearson.shape[1]), dim=1)
        return {
            int(r): [
                {"feature": int(self.feature_ids[j]), "pearson": float(v)}
                for v, j in zip(values[i].tolist(), index[i].tolist(), strict=True)
                if v > -2.0
            ]
            for i, r in enumerate(rows.tolist())
        }


def run(ctx: StepContext, params: FeatureAnalysisParams) -> StepOutput:
    """Every chosen feature of each SAE over the dataset, in one pass."""
    from analyses.feature_analysis.outputs import build_output

    started = time.perf_counter()
    where = f"feature_analysis case {ctx.case_id}"
    saes = load_feature_saes(ctx, params.sae, layers=params.layers, site=params.hook, where=where)
    if len(ctx.dataset) == 0:
        raise ResourceError(f"{where}: the dataset has no passages.\nRaise `dataset.max_passages`.")
    labels = read_features_csv(ctx, params.features_csv, where)
    work = [_analysed(ctx, params, loaded, labels.get(loaded.layer, {}), where) for loaded in saes]
    timing = accumulate(ctx, work, params.batch_size, params.exclude_special_tokens)
    for item in work:
        start = time.perf_counter()
        item.table = item.accumulator.finish()
        item.effects = logit_effects(
            _decoder_in_residual(ctx, item), ctx.model.model.W_U.detach(), k=params.top_logits
        )
        timing["finish_and_logit_effects"] = timing.get("finish_and_logit_effects", 0.0) + (
            time.perf_counter() - start
        )
    return build_output(ctx, params, work, timing, started)


def _analysed(
    ctx: StepContext, params: FeatureAnalysisParams, loaded: LoadedSAE, labels: dict[int, str], where: str
) -> Analysed:
    d_sae = loaded.d_sae
    chosen = list(range(d_sae)) if params.features == "all" else list(params.features)
    chosen += [f for f in labels if f not in set(chosen)]
    bad = sorted(f for f in chosen if f >= d_sae)
    if bad:
        raise ResourceError(
            f"{where}: features {bad[:10]} do not exist in the SAE for layer {loaded.layer}, which has "
            f"{d_sae} features (0-{d_sae - 1}).\n"
            f"Choose features below {d_sae} (`features` or `features_csv`)."
        )
    ids = torch.tensor(chosen, dtype=torch.int64)
    accumulator = FeatureAccumulator(
        ids, params.max_examples, params.buffer, params.interval_samples, seed=ctx.seed
    )
    item = Analysed(loaded, ids, labels, accumulator)
    listed = [] if params.features == "all" else list(params.features)
    named = list(dict.fromkeys([*listed, *labels]))
    if params.correlated > 0 and named:
        row = {f: i for i, f in enumerate(chosen)}
        item.correlate = torch.tensor([row[f] for f in named], dtype=torch.int64)
        item.sum_xy = torch.zeros(len(named), len(chosen), dtype=torch.float64)
    return item


def eligible_mask(tokens: torch.Tensor, special: torch.Tensor | None) -> torch.Tensor:
    """``(B, T)`` bool: positions counted (all, or all but those holding a special token)."""
    if special is None or special.numel() == 0:
        return torch.ones(tokens.shape, dtype=torch.bool)
    return ~torch.isin(tokens, special)


def _special_ids(ctx: StepContext, exclude: bool) -> torch.Tensor | None:
    if not exclude:
        return None
    ids = getattr(ctx.model.tokenizer, "all_special_ids", None) or []
    return torch.tensor(sorted(set(ids)), dtype=torch.int64)


def accumulate(
    ctx: StepContext, work: list[Analysed], batch_size: int, exclude_special: bool
) -> dict[str, float]:
    """One pass over the dataset: per batch, the model up to the last hook, each SAE's encode, each
    accumulator's update. Returns seconds per stage."""
    model = ctx.model.model
    device = next(model.parameters()).device
    dataset = ctx.dataset
    special = _special_ids(ctx, exclude_special)
    stop = max(stop_layer(item.loaded.hook_name) for item in work)
    hooks = [item.loaded.hook_name for item in work]
    timing = {"forward": 0.0, "encode": 0.0, "accumulate": 0.0}
    first = 0
    batches = ctx.progress(dataset.batches(batch_size), dataset.n_batches(batch_size), "passages")
    for tokens in batches:
        start = time.perf_counter()
        kept, _ = capture(model, tokens.to(device), hooks, stop_at_layer=stop)
        timing["forward"] += time.perf_counter() - start
        eligible = eligible_mask(tokens, special)
        for item in work:
            start = time.perf_counter()
            with torch.no_grad():
                acts = item.loaded.encode(kept[item.loaded.hook_name])  # (B, T, d_sae)
                if len(item.feature_ids) != item.loaded.d_sae:
                    acts = acts[..., item.feature_ids.to(acts.device)]  # (B, T, F)
                acts = acts.float().cpu()
            timing["encode"] += time.perf_counter() - start
            start = time.perf_counter()
            item.accumulator.add(acts, eligible, first * tokens.shape[1])
            item.add_products(acts, eligible)
            timing["accumulate"] += time.perf_counter() - start
        first += tokens.shape[0]
    return timing


def _decoder_in_residual(ctx: StepContext, item: Analysed) -> torch.Tensor:
    """``(F, d_model)`` the analysed features' decoder directions as written to the residual stream
    (through the MLP's output weights for an SAE on ``mlp_post``)."""
    w_dec = item.loaded.sae.W_dec.detach()[item.feature_ids.to(item.loaded.sae.W_dec.device)].float()
    if item.loaded.site == "mlp_post":
        w_dec = w_dec @ ctx.model.model.blocks[item.loaded.layer].mlp.W_out.detach().float()
    return w_dec.cpu()


def vocabulary(ctx: StepContext) -> list[str]:
    """Every token id's text (decoded alone), once per run."""
    tokenizer = ctx.model.tokenizer
    size = int(ctx.model.model.cfg.d_vocab)

    def build() -> list[str]:
        texts: list[str] = tokenizer.batch_decode([[i] for i in range(size)])
        return texts

    return list(ctx.cached(("vocabulary texts", id(tokenizer), size), build))


def token_texts(vocab: list[str]) -> Any:
    """``ids → [text]`` over ``vocab`` (ids past its end, e.g. padded embedding rows, as ``<id>``)."""

    def texts(ids: np.ndarray) -> list[str]:
        return [vocab[int(i)] if 0 <= int(i) < len(vocab) else f"<{int(i)}>" for i in ids]

    return texts
