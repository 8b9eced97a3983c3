"""The clean pass of a batch of passages: what both methods compare against.

One forward pass per batch keeps the activations at each SAE's hook, the selected features' clean
activations, and the clean predictions (:class:`CleanReference`; the loop also keeps the clean
logits). For the fast path it also keeps the input of each block an intervention pass starts at and
the keys and values of later blocks, which its rows reuse for their unchanged positions.

TransformerLens' forward computes every SAE's activations, as in the loop, so that both methods
see the same features fire at the same positions. When the fast path's rows run on the lean forward,
the blocks after the last SAE's hook run on it too (:func:`lean_from`): the clean keys, values and
predictions the rows are compared with then come from the same computation as the rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from analyses._sae_tensors import CleanReference, capture, logits_from_resid
from analyses.sae_interventions.workload import Intervention, Workload
from runner.hooks import hook_name, parse_hook

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["CleanBatch", "changed_positions", "clean_batch", "clean_loss", "entry", "lean_from"]


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
    embedding for the lean forward, before it for TransformerLens' cache; see ``_key_hook``), from
    TransformerLens' forward before :func:`lean_from`, from the lean forward after."""
    clean_logits: torch.Tensor | None = None
    """Loop: the clean logits of the predicting positions ``(B, T-1, V)``."""

    @property
    def n_predicting(self) -> int:
        """Positions per passage that predict a next token."""
        return int(self.tokens.shape[1]) - 1


def entry(hook: str, n_layers: int) -> tuple[int, bool]:
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


def lean_from(workload: Workload, n_layers: int) -> int:
    """The first block of the fast path's clean pass that runs on the lean forward: the one after the
    last SAE's hook (``n_layers``, none, on TransformerLens' blocks)."""
    if workload.lean is None:
        return n_layers
    layers = [parse_hook(loaded.hook_name) for loaded in workload.saes]
    return max(parsed[0] for parsed in layers if parsed is not None) + 1


def clean_batch(
    model: HookedTransformer, tokens: torch.Tensor, first: int, workload: Workload, *, fast: bool
) -> CleanBatch:
    """The clean forward pass of a batch: what both methods compare against (and the fast path reuses)."""
    n_layers = model.cfg.n_layers
    hooks = [loaded.hook_name for loaded in workload.saes]
    entries = {entry(h, n_layers) for h in hooks}
    lean = lean_from(workload, n_layers) if fast else n_layers
    first_start = min(start for start, _ in entries)
    if fast:
        hooks += [_start_input_hook(start, n_layers) for start, _ in entries if start < lean]
        for layer in range(first_start, lean):
            hooks += [_key_hook(workload, layer), f"blocks.{layer}.attn.hook_v"]
    acts, before_lean = capture(model, tokens, hooks, stop_at_layer=lean)
    assert before_lean is not None
    resid = before_lean
    kv_after: list[tuple[torch.Tensor, torch.Tensor]] = []
    if lean < n_layers:
        assert workload.lean is not None
        with torch.no_grad():
            resid = workload.lean.run(before_lean, lean, n_layers, keep_kv=kv_after)  # (B, T, d)
    clean = CleanReference.of(model, resid, tokens, workload.unembedding)
    with torch.no_grad():
        eligible = workload.eligible(tokens)
        feats = []
        for loaded, features in zip(workload.saes, workload.features, strict=True):
            f = loaded.encode(acts[loaded.hook_name])[..., features]  # (B, T, n_slots)
            feats.append(f * eligible.unsqueeze(-1).to(f.dtype))
    sae_acts = {loaded.hook_name: acts[loaded.hook_name] for loaded in workload.saes}
    batch = CleanBatch(tokens, first, clean, eligible, sae_acts, feats)
    if not fast:
        with torch.no_grad():  # loop_batch unembeds the intervened passes the same way
            batch.clean_logits = logits_from_resid(model, resid[:, :-1])  # (B, T-1, V)
        return batch
    batch.starts = {
        start: acts[_start_input_hook(start, n_layers)] if start < lean else before_lean
        for start, _ in entries
    }
    batch.kv = {
        layer: (acts[_key_hook(workload, layer)], acts[f"blocks.{layer}.attn.hook_v"])
        for layer in range(first_start, lean)
    }
    batch.kv.update(zip(range(lean, n_layers), kv_after, strict=True))
    return batch


def _key_hook(workload: Workload, layer: int) -> str:
    """Keys as the fast path's prefix takes them: rotated for the lean forward, as TransformerLens'
    key-value cache holds them (before rotation) otherwise."""
    return workload.lean.key_hook(layer) if workload.lean is not None else f"blocks.{layer}.attn.hook_k"


def clean_loss(batch: CleanBatch) -> float:
    """The batch's summed clean next-token loss."""
    return float(batch.clean.loss.sum(dtype=torch.float64))


def changed_positions(batch: CleanBatch, workload: Workload, iv: Intervention) -> torch.Tensor:
    """``(B, T)`` positions whose activation the intervention changes."""
    f = batch.feats[iv.layer][..., iv.slot]  # (B, T)
    return (workload.edited(f, iv.alpha) != f) & batch.eligible
