"""Tensor helpers shared by the SAE analyses (``train_sae``, ``sae_interventions``).

Which positions an SAE sees (every position but a leading BOS token, whose residual stream is an
outlier SAEs are not trained on), activations read at a hook with the forward pass stopped right
after it, per-feature firing statistics, and logits from a final residual stream.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from runner.saes.loading import LoadedSAE

__all__ = [
    "PADDING",
    "CleanReference",
    "FeatureStats",
    "RowComparison",
    "Unembedding",
    "capture",
    "compare_rows",
    "eligible_positions",
    "feature_stats",
    "log_sum_exp_",
    "logits_are_capped",
    "logits_from_resid",
    "normed_resid",
    "shift_to_logits",
    "stop_layer",
]

PADDING = "right"
"""Passages are never padded; ``right`` keeps TransformerLens from masking tokens whose id is the pad
id, which it does when the tokenizer pads on the left."""


def eligible_positions(tokens: torch.Tensor, bos_id: int | None, exclude_bos: bool) -> torch.Tensor:
    """``(B, T)`` bool: the positions an SAE reads and may edit (all but a leading BOS when excluded)."""
    mask = torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)
    if exclude_bos and bos_id is not None:
        mask[:, 0] = tokens[:, 0] != bos_id
    return mask


def stop_layer(hook: str) -> int:
    """The ``stop_at_layer`` that runs the model just far enough to reach ``hook`` (``blocks.{L}...``)."""
    return int(hook.split(".")[1]) + 1


def capture(
    model: HookedTransformer, tokens: torch.Tensor, hooks: list[str], *, stop_at_layer: int | None
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Run ``tokens`` and keep the activations at ``hooks``; returns them and the final residual stream.

    With ``stop_at_layer`` below the number of layers the second value is that layer's input and the
    rest of the model is not run. The residual is taken before ``ln_final`` (see
    :func:`logits_from_resid`).
    """
    kept: dict[str, torch.Tensor] = {}

    def keep(act: torch.Tensor, hook: Any) -> None:
        kept[hook.name] = act.detach()

    with torch.no_grad():
        resid = model.run_with_hooks(
            tokens,
            stop_at_layer=stop_at_layer,
            padding_side=PADDING,
            fwd_hooks=[(name, keep) for name in dict.fromkeys(hooks)],
        )
    return kept, resid


def logits_from_resid(model: HookedTransformer, resid: torch.Tensor) -> torch.Tensor:
    """``(..., d_vocab)`` logits from a final residual stream ``(..., d_model)``, as ``forward`` does."""
    from transformer_lens.utilities.activation_functions import apply_softcap

    if model.cfg.normalization_type is not None:
        resid = model.ln_final(resid)
    return apply_softcap(model.unembed(resid), model.cfg.output_logits_soft_cap)


@dataclass
class FeatureStats:
    """Streaming per-feature statistics of SAE activations over eligible positions."""

    d_sae: int
    n_tokens: int = 0
    counts: torch.Tensor = field(init=False)
    """``(d_sae,)`` int64: positions where the feature fires (activation > 0)."""
    sums: torch.Tensor = field(init=False)
    """``(d_sae,)`` float64: sum of activations."""
    maxima: torch.Tensor = field(init=False)
    """``(d_sae,)`` float64: largest activation."""

    def __post_init__(self) -> None:
        self.counts = torch.zeros(self.d_sae, dtype=torch.int64)
        self.sums = torch.zeros(self.d_sae, dtype=torch.float64)
        self.maxima = torch.zeros(self.d_sae, dtype=torch.float64)

    def add(self, acts: torch.Tensor) -> None:
        """Add feature activations ``(N, d_sae)`` of N eligible positions."""
        acts = acts.detach()
        self.counts += (acts > 0).sum(0).cpu()
        self.sums += acts.sum(0, dtype=torch.float64).cpu()
        if acts.shape[0]:
            self.maxima = torch.maximum(self.maxima, acts.max(0).values.double().cpu())
        self.n_tokens += int(acts.shape[0])

    def frequency(self) -> np.ndarray:
        """``(d_sae,)`` fraction of positions where each feature fires."""
        return self.counts.numpy() / max(self.n_tokens, 1)

    def mean(self) -> np.ndarray:
        """``(d_sae,)`` mean activation over all positions (zeros included)."""
        return self.sums.numpy() / max(self.n_tokens, 1)


def feature_stats(
    model: HookedTransformer,
    batches: Iterator[torch.Tensor],
    saes: list[LoadedSAE],
    eligible: Callable[[torch.Tensor], torch.Tensor],
) -> list[FeatureStats]:
    """Per-feature statistics of each SAE over every eligible position of ``batches`` (one forward each)."""
    stats = [FeatureStats(loaded.d_sae) for loaded in saes]
    device = next(model.parameters()).device
    stop = max(stop_layer(loaded.hook_name) for loaded in saes)
    for tokens in batches:
        tokens = tokens.to(device)
        acts, _ = capture(model, tokens, [s.hook_name for s in saes], stop_at_layer=stop)
        mask = eligible(tokens)  # (B, T)
        with torch.no_grad():
            for loaded, stat in zip(saes, stats, strict=True):
                stat.add(loaded.encode(acts[loaded.hook_name][mask]))  # (N, d_sae)
    return stats


# ----------------------------------------------------------------------------------------------
# Comparing an edited run's next-token predictions with the clean run's


def normed_resid(model: HookedTransformer, resid: torch.Tensor) -> torch.Tensor:
    """The unembedding's input: ``ln_final(resid)`` (or ``resid`` for models without a final norm)."""
    return model.ln_final(resid) if model.cfg.normalization_type is not None else resid


@dataclass(frozen=True)
class Unembedding:
    """The model's unembedding with its weight transposed once.

    TransformerLens' ``Unembed`` copies ``W_U.T`` (d_vocab x d_model) on every call; scoring calls it
    once per batch of rows. ``F.linear`` with the same contiguous weight gives the same numbers.
    """

    weight: torch.Tensor
    """``(d_vocab, d_model)``, contiguous."""
    bias: torch.Tensor | None
    """``(d_vocab,)``; ``None`` when all zeros (most models): adding 0.0 changes no logit, and a bias
    costs a full pass over the ``(N, d_vocab)`` output before the matmul."""
    soft_cap: float | None
    scratch: threading.local = field(default_factory=threading.local, compare=False, repr=False)
    """Per thread, the float32 buffer :meth:`scratch_logits` reuses (``scratch.logits``; the fast path
    scores passes in several threads at once). A fresh logits-sized tensor per call costs more than
    the exp and sums over it: the allocator maps new pages, and each faults on first write."""

    @classmethod
    def of(cls, model: HookedTransformer) -> Unembedding:
        """The unembedding of ``model`` (its current weights)."""
        cap = model.cfg.output_logits_soft_cap
        bias = model.b_U.detach().clone()
        weight = model.W_U.detach().T.contiguous()
        return cls(weight, bias if bool(bias.any()) else None, cap if cap and cap > 0 else None)

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        """``(..., d_vocab)`` logits of the unembedding's input ``normed`` ``(..., d_model)``."""
        from transformer_lens.utilities.activation_functions import apply_softcap

        return apply_softcap(torch.nn.functional.linear(normed, self.weight, self.bias), self.soft_cap)

    def scratch_logits(self, normed: torch.Tensor) -> torch.Tensor:
        """The same logits as float32, written into a buffer that the next call from the same thread
        overwrites: use them up before calling again."""
        if self.weight.dtype != torch.float32 or self.soft_cap is not None:
            return self.logits(normed).float()
        flat = normed.reshape(-1, normed.shape[-1])  # (N, d_model)
        size = flat.shape[0] * self.weight.shape[0]
        buffer = getattr(self.scratch, "logits", None)
        if buffer is None or buffer.numel() < size or buffer.device != flat.device:
            buffer = self.scratch.logits = torch.empty(size, dtype=torch.float32, device=flat.device)
        out = buffer[:size].view(flat.shape[0], self.weight.shape[0])  # (N, d_vocab)
        if self.bias is None:
            torch.mm(flat, self.weight.T, out=out)
        else:
            torch.addmm(self.bias, flat, self.weight.T, out=out)
        return out.view(*normed.shape[:-1], self.weight.shape[0])


@dataclass
class CleanReference:
    """What comparing edited runs with the clean run needs at each predicting position ``(B, T-1)``.

    Without a logit soft cap the logits are affine in the normalized residual ``n``
    (``logits = n @ W_U + b_U``), so every comparison reduces to ``d_model``-sized vectors:

    - ``Δloss = (lse' - lse) - (n' - n) · W_U[:, target]``
    - ``KL(p ‖ q) = Σ_v p_v (logits_v - logits'_v) - (lse - lse') Σ_v p_v``
      ``= -u · (n' - n) + (lse' - lse) Σ_v p_v`` with ``u = p @ W_U^T``
    - summed logit changes ``Σ_t (logits' - logits) = (Σ_t (n' - n)) @ W_U``

    so the clean run keeps no ``(B, T, d_vocab)`` tensor. With a soft cap (Gemma 2) the clean
    log-probabilities are kept and the same quantities are computed over the vocabulary.

    An unchanged position compares as 0 only to float32 rounding, not exactly: recomputed by another
    pass (other shapes, other kernels) its residual may differ from the clean one in the last bits,
    and even an identical residual gets its log-sum-exp from an unembedding matmul on another number
    of rows than the clean pass's. Exact zeros come from not comparing what cannot change: the fast
    path of ``sae_interventions`` skips identities and passages it does not edit, never runs a
    pass's positions before its first edit, and takes a row's positions from there to its own first
    edit as the clean run.
    """

    normed: torch.Tensor
    """``(B, T-1, d_model)``."""
    lse: torch.Tensor
    """``(B, T-1)`` log-sum-exp of the clean logits."""
    weighted_unembed: torch.Tensor
    """``(B, T-1, d_model)`` float64 ``u = p @ W_U^T`` (empty with a soft cap)."""
    prob_sum: torch.Tensor
    """``(B, T-1)`` float64 ``Σ_v p_v`` (1 up to rounding)."""
    top: torch.Tensor
    """``(B, T-1)`` the clean top-1 token."""
    top_prob: torch.Tensor
    """``(B, T-1)`` its probability."""
    targets: torch.Tensor
    """``(B, T-1)`` the next tokens."""
    loss: torch.Tensor
    """``(B, T-1)`` the clean next-token loss."""
    unembedding: Unembedding
    """Turns normalized residuals into logits."""
    logp: torch.Tensor | None = None
    """``(B, T-1, d_vocab)`` clean log-probabilities, kept only for soft-capped logits."""

    @property
    def in_vocab_space(self) -> bool:
        """Whether comparisons run over the vocabulary (soft-capped logits) instead of d_model."""
        return self.logp is not None

    @classmethod
    def of(
        cls, model: HookedTransformer, resid: torch.Tensor, tokens: torch.Tensor, unembedding: Unembedding
    ) -> CleanReference:
        """From the clean final residual stream ``(B, T, d_model)`` of ``tokens`` ``(B, T)``."""
        with torch.no_grad():
            normed = normed_resid(model, resid[:, :-1])  # (B, T-1, d)
            logits = unembedding.scratch_logits(normed)  # (B, T-1, V)
            capped = logits_are_capped(model)
            loss = -logits.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
            exp = logits.clone() if capped else logits
            lse, top_logit, top = log_sum_exp_(exp)  # exp now holds exp(logits - max)
            logp = logits - lse.unsqueeze(-1) if capped else None  # as compare_rows' log q
            probs = exp.div_(exp.sum(-1, keepdim=True))
            weighted = torch.empty(0) if capped else (probs @ unembedding.weight.float()).double()
            return cls(
                normed=normed,
                lse=lse,
                weighted_unembed=weighted,
                prob_sum=probs.sum(-1).double(),  # a float64 reduction over the vocabulary is 10x slower
                top=top,
                top_prob=(top_logit - lse).exp(),
                targets=tokens[:, 1:],
                loss=loss + lse,
                unembedding=unembedding,
                logp=logp,
            )


def log_sum_exp_(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-sum-exp, largest value and its index over the last dimension of float32 ``logits``, in
    three passes over the vocabulary (max, exp in place, sum) instead of ``torch.logsumexp`` plus ``max``.

    Overwrites ``logits`` with ``exp(logits - max)``. The clean run and the edited rows both use it,
    so identical logits give identical results.
    """
    top_logit, top = logits.max(-1)
    logits.sub_(top_logit.unsqueeze(-1)).exp_()
    return logits.sum(-1).log_().add_(top_logit), top_logit, top


@dataclass
class RowComparison:
    """Rows (a passage under some edit) against the clean run, from position ``s`` on: ``(R, P)`` each."""

    delta_loss: torch.Tensor
    kl: torch.Tensor
    new_top: torch.Tensor
    new_top_prob: torch.Tensor
    shift: torch.Tensor
    """``(R, P, K)`` change of the unembedding's input (K = d_model) or of the logits (K = d_vocab)."""
    clean_top: torch.Tensor
    """The clean top-1 token, as the comparison's own clean side computes it: a row whose logits are
    the clean ones has ``new_top == clean_top``."""
    clean_top_prob: torch.Tensor
    """Its probability."""


def compare_rows(
    model: HookedTransformer, resid: torch.Tensor, clean: CleanReference, passages: torch.Tensor, s: int
) -> RowComparison:
    """Compare final residuals ``resid`` ``(R, P, d)`` of rows whose passages are ``passages`` ``(R,)``,
    covering predicting positions ``s .. s+P-1``, with the clean run of those passages."""
    stop = s + resid.shape[1]
    normed = normed_resid(model, resid)  # (R, P, d)
    logits = clean.unembedding.scratch_logits(normed)  # (R, P, V)
    if clean.logp is not None:
        lse, top_logit, new_top = log_sum_exp_(logits.clone())
        return _compare_in_vocab(logits, lse, clean, passages, s, stop, new_top, (top_logit - lse).exp())
    lse, top_logit, new_top = log_sum_exp_(logits)
    lse_change = lse - clean.lse[passages, s:stop]  # (R, P)
    shift = normed - clean.normed[passages, s:stop]  # (R, P, d)
    target_rows = clean.unembedding.weight[clean.targets[passages, s:stop]]  # (R, P, d)
    delta_loss = lse_change.double() - (shift * target_rows).sum(-1, dtype=torch.float64)
    kl = -(clean.weighted_unembed[passages, s:stop] * shift.double()).sum(-1)
    kl = kl + lse_change.double() * clean.prob_sum[passages, s:stop]
    clean_top, clean_top_prob = clean.top[passages, s:stop], clean.top_prob[passages, s:stop]
    return RowComparison(delta_loss, kl, new_top, (top_logit - lse).exp(), shift, clean_top, clean_top_prob)


def _compare_in_vocab(
    logits: torch.Tensor,
    lse: torch.Tensor,
    clean: CleanReference,
    passages: torch.Tensor,
    s: int,
    stop: int,
    new_top: torch.Tensor,
    new_top_prob: torch.Tensor,
) -> RowComparison:
    """The same comparison over the vocabulary, for soft-capped logits (not affine in the residual)."""
    assert clean.logp is not None
    logq = logits - lse.unsqueeze(-1)  # (R, P, V)
    logp = clean.logp[passages, s:stop]
    targets = clean.targets[passages, s:stop].unsqueeze(-1)
    delta_loss = (logp.gather(-1, targets) - logq.gather(-1, targets)).squeeze(-1).double()
    kl = (logp.exp() * (logp - logq)).sum(-1, dtype=torch.float64)
    shift = logits - (logp + clean.lse[passages, s:stop].unsqueeze(-1))
    clean_top, clean_top_prob = clean.top[passages, s:stop], clean.top_prob[passages, s:stop]
    return RowComparison(delta_loss, kl, new_top, new_top_prob, shift, clean_top, clean_top_prob)


def shift_to_logits(model: HookedTransformer, sums: torch.Tensor, in_vocab_space: bool) -> torch.Tensor:
    """Summed ``shift`` vectors ``(N, K)`` as summed logit changes ``(N, d_vocab)``."""
    return sums if in_vocab_space else sums @ model.W_U.double()


def logits_are_capped(model: HookedTransformer) -> bool:
    """Whether the model soft-caps its logits (then they are not affine in the residual stream)."""
    cap = model.cfg.output_logits_soft_cap
    return bool(cap is not None and cap > 0)
