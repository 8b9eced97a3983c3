"""The fast path: the same numbers as the loop, computing only what an intervention can change.

Skipped, exactly: alpha = 1 under ``scale`` (the identity) and passages where the feature never fires
(nothing is edited). The other (passage, intervention) rows run from the block the hook feeds and
from their first edited position on: earlier positions are unchanged in a causal model, so their
keys and values come from the clean pass as a cached prefix. Rows that start at the same block are
packed into forward passes by :func:`cheapest_cuts`, and run through the lean forward
(``analyses/_lean_forward.py``) or TransformerLens' blocks with its key-value cache. A pass starts
at the first edit of its rows; each row's positions before its own first edit are scored as the
clean run (``score_resid``), so everything an intervention leaves unchanged adds exactly 0.

On the CPU the lean passes run in :func:`pass_workers`: threads that each run a whole pass (forward,
unembedding, scoring) with one intra-op thread, several passes at once. Their sums are added in the
order of the passes, so the totals are the same whichever thread finishes first.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from analyses.sae_interventions.clean import CleanBatch, changed_positions, entry
from analyses.sae_interventions.scoring import RowSums, Totals, Work, add_sums, score_resid
from analyses.sae_interventions.workload import Intervention, Workload, feature_delta

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = [
    "MAX_PASS_ROWS",
    "MAX_PASS_WORKERS",
    "PASS_SIZING",
    "PassSizing",
    "cheapest_cuts",
    "fast_batch",
    "pass_workers",
]

FwdHooks = list[tuple[str | Callable[..., Any], Callable[..., Any]]]


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
MAX_PASS_WORKERS = 2
"""Lean passes run at once on the CPU, at most (each with ``torch.get_num_threads() // workers``
intra-op threads). Measured on 2 cores only: two single-threaded passes beat one pass on two threads
by 10-15% unloaded (matmuls on one thread run nearer the core's peak, and elementwise passes need no
thread synchronization), and by far more when other processes take CPU time, since a two-thread
matmul waits for whichever thread was descheduled."""


@contextmanager
def pass_workers(workload: Workload, device: torch.device) -> Iterator[Executor | None]:
    """Threads for the fast path's lean passes, or ``None`` (run in order, in the calling thread) off
    the CPU, on TransformerLens' blocks (its hooks live on the shared model) or with one torch thread.

    ``torch.set_num_threads`` in a worker sets its own intra-op threads and also the default of
    threads started later; the caller's is restored when the workers stop.
    """
    threads = torch.get_num_threads()
    if workload.lean is None or device.type != "cpu" or threads < 2:
        yield None
        return
    workers = min(threads, MAX_PASS_WORKERS)
    pool = ThreadPoolExecutor(
        workers,
        thread_name_prefix="sae-interventions-pass",
        initializer=torch.set_num_threads,
        initargs=(threads // workers,),
    )
    try:
        yield pool
    finally:
        pool.shutdown(cancel_futures=True)
        torch.set_num_threads(threads)


@dataclass(frozen=True)
class _Row:
    """One (passage, intervention) the fast path must run, from position ``t0`` on."""

    start: int
    t0: int
    passage: int
    iv: Intervention


def fast_batch(
    model: HookedTransformer,
    batch: CleanBatch,
    workload: Workload,
    totals: Totals,
    work: Work,
    batch_size: int,
    workers: Executor | None = None,
) -> None:
    """The fast path: skip what cannot change, run the rest from the hook and the first edited position,
    in passes of up to :data:`PASS_SIZING` batches' worth of tokens (``batch_size`` passages each),
    on ``workers`` (:func:`pass_workers`) when given."""
    n_layers, length = model.cfg.n_layers, int(batch.tokens.shape[1])
    sizing = PASS_SIZING["lean" if workload.lean is not None else "transformer_lens"]
    budget = sizing.batches * batch_size * length
    rows: list[_Row] = []
    for iv in workload.interventions:
        if workload.is_identity(iv):
            work.rows_identity += batch.tokens.shape[0]
            continue
        changed = changed_positions(batch, workload, iv)  # (B, T)
        fired = changed.any(1)
        t0 = changed.to(torch.int8).argmax(1)  # (B,) first changed position
        start = entry(workload.saes[iv.layer].hook_name, n_layers)[0]
        work.rows_not_firing += int((~fired).sum())
        rows += [_Row(start, int(t0[b]), b, iv) for b in torch.nonzero(fired).flatten().tolist()]
    rows.sort(key=lambda r: (r.start, r.t0, r.iv.index, r.passage))
    chunks = _chunks(rows, length, budget, sizing.overhead_tokens)
    run = functools.partial(_run_chunk, model, batch, workload, totals.vocab, totals.keep_snippets)
    scored = workers.map(run, chunks) if workers is not None else map(run, chunks)
    for chunk, sums in zip(chunks, scored, strict=True):  # in pass order, whichever finished first
        _count(work, chunk, n_layers, length)
        for part in sums:
            add_sums(totals, part)


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
        chunks += [group[a:b] for a, b in itertools.pairwise(cheapest_cuts(span, budget, overhead))]
    return chunks


def cheapest_cuts(span: np.ndarray, budget: int, overhead: int) -> list[int]:
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
    vocab: int,
    keep_snippets: int,
    chunk: list[_Row],
) -> list[RowSums]:
    """One pass: the chunk's rows from their shared start, scored and summed per row. Reads the batch
    and the model, writes nothing shared (it may run in a worker thread)."""
    n_layers, length = model.cfg.n_layers, int(batch.tokens.shape[1])
    start, s = chunk[0].start, chunk[0].t0  # rows are sorted: s is the smallest t0
    loaded = workload.saes[chunk[0].iv.layer]
    device = batch.tokens.device
    passages = torch.tensor([r.passage for r in chunk], device=device)
    features = torch.tensor([r.iv.feature for r in chunk], device=device)
    slots = torch.tensor([r.iv.slot for r in chunk], device=device)
    with torch.no_grad():  # grad mode is per thread
        x = batch.acts[loaded.hook_name][passages, s:]  # (R, T-s, d)
        f = batch.feats[chunk[0].iv.layer][passages, s:].gather(
            -1, slots.view(-1, 1, 1).expand(-1, length - s, 1)
        )
        f = f.squeeze(-1)  # (R, T-s)
        eligible = batch.eligible[passages, s:]
        new = torch.stack([workload.edited(f[i], r.iv.alpha) for i, r in enumerate(chunk)]) * eligible
        delta = feature_delta(loaded, x, f, new, features)  # (R, T-s, d)
        in_block = entry(loaded.hook_name, n_layers)[1]
        resid_in = batch.starts[start][passages, s:] if in_block else x + delta
        if workload.lean is not None:
            prefix = [(_rows_of(k, passages, s), _rows_of(v, passages, s)) for k, v in _kv_from(batch, start)]
            edits = {loaded.hook_name: lambda act: act + delta} if in_block else None
            resid = workload.lean.run(resid_in, start, n_layers, prefix if s else None, edits=edits)
        else:
            hooks: FwdHooks = [(loaded.hook_name, lambda act, hook: act + delta)] if in_block else []
            cache = _prefix_cache(model, batch, passages, s, start) if s > 0 else None
            with model.hooks(fwd_hooks=hooks):
                resid = model(resid_in, start_at_layer=start, stop_at_layer=n_layers, past_kv_cache=cache)
    first_edit = torch.tensor([r.t0 for r in chunk], device=device)
    ivs = [r.iv for r in chunk]
    return score_resid(model, resid, batch, passages, ivs, s, first_edit, vocab, keep_snippets)


def _count(work: Work, chunk: list[_Row], n_layers: int, length: int) -> None:
    """What a pass computed (and would have, each row from its own first edit), for the FLOP floor."""
    s, rows, blocks = chunk[0].t0, len(chunk), n_layers - chunk[0].start
    work.forward_passes += 1
    work.rows_run += rows
    work.block_token_layers += rows * (length - s) * blocks
    work.attention_pairs_layers += rows * _pairs(s, length) * blocks
    work.unembed_tokens += rows * (length - 1 - s)
    work.needed_block_token_layers += sum(length - r.t0 for r in chunk) * blocks
    work.needed_attention_pairs_layers += sum(_pairs(r.t0, length) for r in chunk) * blocks
    work.needed_unembed_tokens += sum(length - 1 - r.t0 for r in chunk)


def _rows_of(cached: torch.Tensor, passages: torch.Tensor, s: int) -> torch.Tensor:
    """``cached[passages, :s]``: whole rows copied (``index_select``), then the first ``s`` positions.
    Advanced indexing of the strided ``[:, :s]`` view costs several times more."""
    return cached.index_select(0, passages)[:, :s]


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
            _rows_of(keys, passages, s), _rows_of(values, passages, s), frozen=True
        )
    cache.freeze()
    return cache
