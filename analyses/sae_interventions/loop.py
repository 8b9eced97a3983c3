"""The loop: the seed's straightforward method.

One full forward pass per (layer, feature, alpha) and batch of passages, with a hook that encodes
the activation at the SAE's hook and applies the edit, then every metric over the vocabulary from the
clean and the intervened logits (:func:`~analyses.sae_interventions.scoring.compare_over_vocab`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from analyses._sae_tensors import PADDING, logits_from_resid
from analyses.sae_interventions.clean import CleanBatch
from analyses.sae_interventions.scoring import (
    METRIC_CHUNK_ELEMENTS,
    Totals,
    Work,
    accumulate,
    compare_over_vocab,
)
from analyses.sae_interventions.workload import Intervention, Workload, feature_delta
from runner.saes.loading import LoadedSAE

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["loop_batch"]


def loop_batch(
    model: HookedTransformer, batch: CleanBatch, workload: Workload, totals: Totals, work: Work
) -> None:
    """The seed's way: a full forward pass per intervention with the edit applied by a hook, and every
    metric computed over the vocabulary from the clean and the intervened logits.

    The intervened pass is the clean pass's computation (``clean_batch``): every block on the whole
    batch, then ``logits_from_resid`` on the predicting positions. Where the hook adds exactly 0
    (alpha = 1 under ``scale``; passages where a scaled or ablated feature never fires) the logits
    are therefore exactly the clean ones and every metric exactly 0. Unembedding all T positions
    instead would run the unembedding's matmul on other row counts than the clean pass's T - 1, and
    matmul kernels round differently with the row count (MKL: 11 and 12 rows with 2 threads).

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
            resid = model.run_with_hooks(
                batch.tokens,
                stop_at_layer=n_layers,
                padding_side=PADDING,
                fwd_hooks=[(loaded.hook_name, edit)],
            )  # (B, T, d), before ln_final, as clean_batch's
            logits = logits_from_resid(model, resid[:, :-1])  # (B, T-1, V)
        work.forward_passes += 1
        work.rows_run += n_passages
        work.block_token_layers += n_passages * length * n_layers
        work.attention_pairs_layers += n_passages * length * (length + 1) // 2 * n_layers
        work.unembed_tokens += n_passages * (length - 1)
        step = max(1, METRIC_CHUNK_ELEMENTS // ((length - 1) * totals.vocab))
        for lo in range(0, n_passages, step):
            chunk = passages[lo : lo + step]
            with torch.no_grad():
                rows = compare_over_vocab(logits[chunk], batch.clean_logits[chunk], batch.tokens[chunk, 1:])
            accumulate(rows, batch, chunk, [iv] * len(chunk), 0, totals)


def _loop_edit(
    loaded: LoadedSAE, iv: Intervention, workload: Workload, eligible: torch.Tensor
) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """The loop's hook: encode the activation, edit one feature, keep the reconstruction error."""
    features = torch.full((eligible.shape[0],), iv.feature, device=eligible.device)

    def edit(act: torch.Tensor, hook: Any) -> torch.Tensor:
        f = loaded.encode(act)[..., iv.feature] * eligible  # (B, T)
        return act + feature_delta(loaded, act, f, workload.edited(f, iv.alpha) * eligible, features)

    return edit
