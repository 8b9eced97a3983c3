"""Scoring: the metrics of intervened rows against the clean run, and their sums per intervention.

Each method has its own metric code. The loop's, :func:`compare_over_vocab`, works over the
vocabulary from the clean and the intervened logits, straight from the definitions; the fast
path's, :func:`score_resid`, uses the ``d_model``-sized identities of :class:`CleanReference`
(``analyses/_sae_tensors.py``). Both give a :class:`RowComparison` per row and position, which
:func:`reduce_rows` sums per row (:class:`RowSums`) and :func:`add_sums` adds to the same totals;
nothing else is shared, so the agreement of the two methods checks both. The fast path reduces rows
in the threads that ran them and adds the sums in the order of its passes, so its totals do not
depend on which thread finished first.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from analyses._sae_tensors import RowComparison, compare_rows
from analyses.sae_interventions.clean import CleanBatch, changed_positions
from analyses.sae_interventions.workload import Intervention, Workload

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = [
    "METRIC_CHUNK_ELEMENTS",
    "FeatureCounts",
    "Result",
    "RowSums",
    "Snippet",
    "Totals",
    "Work",
    "accumulate",
    "add_sums",
    "compare_over_vocab",
    "count_features",
    "reduce_rows",
    "score_resid",
]

METRIC_CHUNK_ELEMENTS = 1 << 25
"""Logit-sized tensors are processed in row chunks of at most this many elements (128 MB in float32)."""


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
class Result:
    """What the batch loop accumulated."""

    totals: Totals
    counts: FeatureCounts
    work: Work
    clean_loss_sum: float
    n_predicting: int
    batch_size: int


def count_features(batch: CleanBatch, workload: Workload, counts: FeatureCounts, totals: Totals) -> None:
    """Firing counts per (layer, feature) and edited positions per intervention; no forward pass needed."""
    counts.eligible_tokens += int(batch.eligible.sum())
    for layer, f in enumerate(batch.feats):
        fires = f > 0  # (B, T, n_slots)
        n = fires.shape[-1]
        counts.fire_tokens[layer, :n] += fires.sum((0, 1)).cpu().numpy()
        counts.fire_predicting[layer, :n] += fires[:, :-1].sum((0, 1)).cpu().numpy()
        counts.fire_passages[layer, :n] += fires.any(1).sum(0).cpu().numpy()
    for iv in workload.interventions:
        totals.intervened[iv.index] += int(changed_positions(batch, workload, iv).sum())


def compare_over_vocab(
    logits: torch.Tensor, clean_logits: torch.Tensor, targets: torch.Tensor
) -> RowComparison:
    """The metrics of intervened ``logits`` against ``clean_logits`` (both ``(R, P, V)``) straight from
    their definitions: Δloss = CE(q) - CE(p), KL(p ‖ q) = Σ_v p_v (log p_v - log q_v), logit changes,
    and the top-1 token of each."""
    logp = torch.log_softmax(clean_logits.float(), dim=-1)
    logq = torch.log_softmax(logits.float(), dim=-1)
    target = targets.unsqueeze(-1)
    delta_loss = (logp.gather(-1, target) - logq.gather(-1, target)).squeeze(-1).double()
    kl = (logp.exp() * (logp - logq)).sum(-1).double()  # float32 over V, as the fast path
    new_top_logp, new_top = logq.max(-1)
    clean_top_logp, clean_top = logp.max(-1)
    shift = logits.float() - clean_logits.float()
    return RowComparison(delta_loss, kl, new_top, new_top_logp.exp(), shift, clean_top, clean_top_logp.exp())


def score_resid(
    model: HookedTransformer,
    resid: torch.Tensor,
    batch: CleanBatch,
    passages: torch.Tensor,
    ivs: list[Intervention],
    s: int,
    first_edit: torch.Tensor,
    vocab: int,
    keep_snippets: int,
) -> list[RowSums]:
    """The metrics of rows ``(passage, intervention)`` whose final residual ``resid`` ``(R, T-s, d)``
    starts at position ``s``, each row edited from position ``first_edit`` ``(R,)`` on, summed per row.

    A causal model leaves every position before a row's first edit unchanged: positions before ``s``
    are not run, and those from ``s`` to the row's first edit, run again with the rest of the pass,
    are taken as the clean run (:func:`_clean_before`). Both add exactly 0.
    """
    n_pred = batch.n_predicting - s
    if n_pred <= 0:
        return []
    step = max(1, METRIC_CHUNK_ELEMENTS // (n_pred * vocab))
    sums = []
    for lo in range(0, len(ivs), step):
        hi = min(lo + step, len(ivs))
        with torch.no_grad():
            rows = compare_rows(model, resid[lo:hi, :n_pred], batch.clean, passages[lo:hi], s)
            rows = _clean_before(rows, first_edit[lo:hi], s)
            sums.append(reduce_rows(rows, batch, passages[lo:hi], ivs[lo:hi], s, keep_snippets))
    return sums


def _clean_before(rows: RowComparison, first_edit: torch.Tensor, s: int) -> RowComparison:
    """``rows`` ``(R, P)`` (positions ``s .. s+P-1``) with every position before a row's ``first_edit``
    set to the clean run's: no change, the clean top-1 token. Recomputed in a pass that started
    earlier, such a position differs from the clean run only by float32 rounding (other kernels)."""
    positions = torch.arange(s, s + rows.kl.shape[1], device=first_edit.device)
    before = positions < first_edit.unsqueeze(1)  # (R, P)
    if not bool(before.any()):
        return rows
    return RowComparison(
        delta_loss=rows.delta_loss.masked_fill(before, 0.0),
        kl=rows.kl.masked_fill(before, 0.0),
        new_top=torch.where(before, rows.clean_top, rows.new_top),
        new_top_prob=torch.where(before, rows.clean_top_prob, rows.new_top_prob),
        shift=rows.shift.masked_fill(before.unsqueeze(-1), 0.0),
        clean_top=rows.clean_top,
        clean_top_prob=rows.clean_top_prob,
    )


@dataclass
class RowSums:
    """Compared rows reduced per row: what :func:`add_sums` adds to the sums of their interventions."""

    ivs: list[Intervention]
    """The row's intervention, per row ``(R,)``."""
    delta_loss: torch.Tensor
    """``(R,)`` float64 sums over the rows' positions; ``*_fire`` over those where the feature fires."""
    kl: torch.Tensor
    delta_loss_fire: torch.Tensor
    kl_fire: torch.Tensor
    changed_top1: torch.Tensor
    shift: torch.Tensor
    """``(R, K)`` float64 summed shifts (see :class:`RowComparison`)."""
    shift_fire: torch.Tensor
    snippets: list[list[tuple[float, int, Snippet]]]
    """Per row, its positions of largest KL > 0 as heap items ``(kl, tie-break, snippet)``."""


def accumulate(
    rows: RowComparison,
    batch: CleanBatch,
    passages: torch.Tensor,
    ivs: list[Intervention],
    s: int,
    totals: Totals,
) -> None:
    """Add compared rows ``(R, P)`` (predicting positions ``s .. s+P-1``) to their interventions' sums."""
    add_sums(totals, reduce_rows(rows, batch, passages, ivs, s, totals.keep_snippets))


def reduce_rows(
    rows: RowComparison,
    batch: CleanBatch,
    passages: torch.Tensor,
    ivs: list[Intervention],
    s: int,
    keep_snippets: int,
) -> RowSums:
    """Compared rows ``(R, P)`` (predicting positions ``s .. s+P-1``) summed over their positions."""
    stop = s + rows.kl.shape[1]
    fires = torch.stack(
        [batch.feats[iv.layer][p, s:stop, iv.slot] for iv, p in zip(ivs, passages.tolist(), strict=True)]
    )
    fires = (fires > 0).to(torch.float64)  # (R, P)
    shift = rows.shift.double()  # (R, P, K)
    return RowSums(
        ivs=ivs,
        delta_loss=rows.delta_loss.sum(1),
        kl=rows.kl.sum(1),
        delta_loss_fire=(rows.delta_loss * fires).sum(1),
        kl_fire=(rows.kl * fires).sum(1),
        changed_top1=(rows.new_top != rows.clean_top).sum(1).double(),
        shift=shift.sum(1),
        shift_fire=torch.einsum("rp,rpk->rk", fires, shift),
        snippets=_snippets(rows, batch, passages, s, keep_snippets),
    )


def add_sums(totals: Totals, sums: RowSums) -> None:
    """Add rows' sums to their interventions' totals, and their snippets to the kept ones."""
    index = torch.tensor([iv.index for iv in sums.ivs], device=sums.kl.device)
    totals.delta_loss.index_add_(0, index, sums.delta_loss)
    totals.kl.index_add_(0, index, sums.kl)
    totals.delta_loss_fire.index_add_(0, index, sums.delta_loss_fire)
    totals.kl_fire.index_add_(0, index, sums.kl_fire)
    totals.changed_top1.index_add_(0, index, sums.changed_top1)
    totals.logit_sum.index_add_(0, index, sums.shift)
    totals.logit_sum_fire.index_add_(0, index, sums.shift_fire)
    keep = totals.keep_snippets
    for iv, items in zip(sums.ivs, sums.snippets, strict=True):
        heap = totals.snippets[iv.index]
        for item in items:
            if len(heap) < keep:
                heapq.heappush(heap, item)
            elif item[0] > heap[0][0]:
                heapq.heapreplace(heap, item)


def _snippets(
    rows: RowComparison, batch: CleanBatch, passages: torch.Tensor, s: int, keep: int
) -> list[list[tuple[float, int, Snippet]]]:
    """Per row, its ``keep`` positions of largest KL > 0, as heap items (ties: earlier first)."""
    if not keep:
        return [[] for _ in passages]
    values, where = rows.kl.topk(min(keep, rows.kl.shape[1]), dim=1)  # (R, k)
    out: list[list[tuple[float, int, Snippet]]] = []
    for r in range(len(passages)):
        p = int(passages[r])
        items = []
        for value, pos in zip(values[r].tolist(), where[r].tolist(), strict=True):
            if value <= 0:
                continue
            t = s + pos
            snippet = Snippet(
                kl=value,
                delta_loss=float(rows.delta_loss[r, pos]),
                passage=batch.first + p,
                position=t,
                clean_top=int(rows.clean_top[r, pos]),
                clean_top_prob=float(rows.clean_top_prob[r, pos]),
                new_top=int(rows.new_top[r, pos]),
                new_top_prob=float(rows.new_top_prob[r, pos]),
                target=int(batch.clean.targets[p, t]),
            )
            items.append((value, -(batch.first + p) * 100_000 - t, snippet))
        out.append(items)
    return out
