"""How ``sae_interventions`` computes; ``__init__.py`` declares it (params, result, registration).

:func:`run` wires the modules, data flowing one way: ``select`` (the features, as a ``workload``
of interventions) → per batch of passages, ``clean`` (the clean pass) then ``loop`` or ``fast`` (the
interventions, scored and summed by ``scoring``) → ``outputs`` (tables, result, plots). A CUDA
out-of-memory error halves ``batch_size`` and starts the case again.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch

from analyses._sae_tensors import logits_are_capped
from analyses.sae_interventions import SaeInterventionsParams
from analyses.sae_interventions.clean import clean_batch, clean_loss
from analyses.sae_interventions.fast import fast_batch, pass_workers
from analyses.sae_interventions.loop import loop_batch
from analyses.sae_interventions.outputs import build_output
from analyses.sae_interventions.scoring import FeatureCounts, Result, Totals, Work, count_features
from analyses.sae_interventions.select import build_workload
from analyses.sae_interventions.workload import Workload
from runner.errors import ResourceError, RunnerError
from runner.step import StepContext, StepOutput

__all__ = ["run"]


def run(ctx: StepContext, params: SaeInterventionsParams) -> StepOutput:
    """Scale, clamp or ablate SAE features; Δloss, KL and logit changes per layer, feature and alpha."""
    started = time.perf_counter()
    where = f"sae_interventions case {ctx.case_id}"
    saes = ctx.saes(params.sae, layers=params.layers, site=params.hook, where=where)
    _check_dataset(ctx, where)
    workload = build_workload(ctx, params, saes, where)
    result = _run_with_oom_retry(ctx, params, workload)
    result.work.seconds_clean = round(result.work.seconds_clean, 3)
    seconds = time.perf_counter() - started
    return build_output(ctx, params, workload, result, seconds)


def _check_dataset(ctx: StepContext, where: str) -> None:
    if len(ctx.dataset) == 0 or ctx.dataset.max_len < 2:
        raise ResourceError(
            f"{where}: the dataset needs passages of at least 2 tokens (a next-token loss); it has "
            f"{len(ctx.dataset)} passages of {ctx.dataset.max_len}.\nRaise `dataset.max_len`."
        )


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
    loss_sum = 0.0
    first = 0
    batches = ctx.progress(dataset.batches(batch_size), dataset.n_batches(batch_size), f"batches ({method})")
    with pass_workers(workload, device) if method == "fast" else contextlib.nullcontext() as workers:
        for tokens in batches:
            start = time.perf_counter()
            batch = clean_batch(model, tokens.to(device), first, workload, fast=method == "fast")
            work.clean_tokens += tokens.numel()
            work.seconds_clean += time.perf_counter() - start
            loss_sum += clean_loss(batch)
            count_features(batch, workload, counts, totals)
            start = time.perf_counter()
            if method == "fast":
                fast_batch(model, batch, workload, totals, work, batch_size, workers)
            else:
                loop_batch(model, batch, workload, totals, work)
            work.seconds_interventions += time.perf_counter() - start
            first += tokens.shape[0]
    n_predicting = len(dataset) * (dataset.max_len - 1)
    return Result(totals, counts, work, loss_sum, n_predicting, batch_size)
