"""A lean forward pass through a ``HookedTransformer``'s blocks, for the fast path of interventions.

TransformerLens' blocks are written for hooks and readability. Every call copies each weight matrix
(``W.T.contiguous()``); grouped-query attention repeats keys and values for every query head; and
attention builds its scores, causal mask and pattern one elementwise pass at a time. On SmolLM2-135M
that costs twice the matmuls' time. The fast path of ``sae_interventions`` runs hundreds of
thousands of token-blocks, so it runs the same blocks with:

- weights used as they are stored (``x @ W``: the matmul reads the transposed layout directly),
  with Q, K and V fused into one matmul;
- attention by ``F.scaled_dot_product_attention``, with a prefix of cached keys and values (the
  rows' unchanged positions) and the causal mask offset by its length; grouped-query heads share
  their key-value head without copies;
- TransformerLens' own norms, activation function and rotary embedding.

The block-level hook points are called where TransformerLens calls them (``hook_resid_pre``,
``hook_attn_out``, ``hook_resid_mid``, the MLP's ``hook_pre`` / ``hook_pre_linear`` / ``hook_post``,
``hook_mlp_out``, ``hook_resid_post``), so hooks on them edit the lean pass as they edit
TransformerLens' own. Hooks inside attention (q, k, v, scores, pattern, z) are not called.

Only configurations whose every feature is covered here are accepted (:func:`unsupported_reason`),
and :meth:`LeanForward.of` checks the lean pass against TransformerLens' forward on the model's own
weights before it is used. The two agree to float32 rounding (matmul blocking and softmax order
differ), not bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["LeanForward", "unsupported_reason"]

CHECK_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-4, torch.float16: 0.1, torch.bfloat16: 0.1}
"""Largest difference from TransformerLens the build-time check accepts, relative to the largest
|activation| of the final residual stream, per dtype. float32 rounding gives about 1e-6; 16-bit
rounding through a few layers reaches several percent (up to 7.6% measured on random bfloat16
models), while a structural mistake (head grouping, rotary offset, a bias) differs by order 1."""


def unsupported_reason(model: HookedTransformer) -> str | None:
    """Why the lean pass cannot run ``model``'s blocks exactly as TransformerLens does, or ``None``."""
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    cfg = model.cfg
    flags = {
        "use_attn_in": cfg.use_attn_in,
        "use_split_qkv_input": cfg.use_split_qkv_input,
        "use_attn_result": cfg.use_attn_result,
        "use_hook_mlp_in": cfg.use_hook_mlp_in,
        "use_qk_norm": cfg.use_qk_norm,
        "use_logn_attn": cfg.use_logn_attn,
        "use_dynamic_ntk_rope": cfg.use_dynamic_ntk_rope,
        "use_local_attn": cfg.use_local_attn,
        "use_attention_sinks": cfg.use_attention_sinks,
        "ungroup_grouped_query_attention": cfg.ungroup_grouped_query_attention,
        "attn_only": cfg.attn_only,
        "parallel_attn_mlp": cfg.parallel_attn_mlp,
        "use_normalization_before_and_after": cfg.use_normalization_before_and_after,
        "load_in_4bit": cfg.load_in_4bit,
        "clip_qkv": cfg.clip_qkv is not None,
        "num_experts": cfg.num_experts is not None,
        "attn_scores_soft_cap": cfg.attn_scores_soft_cap is not None and cfg.attn_scores_soft_cap > 0,
        "rotary_base_local": getattr(cfg, "rotary_base_local", None) is not None,
        "layer-norm activation": cfg.is_layer_norm_activation(),
    }
    on = [name for name, value in flags.items() if value]
    if on:
        return f"TransformerLens config sets {', '.join(on)}"
    if cfg.positional_embedding_type not in ("standard", "rotary"):
        return f"positional_embedding_type {cfg.positional_embedding_type!r}"
    if cfg.attention_dir != "causal":
        return f"attention_dir {cfg.attention_dir!r}"
    if cfg.attn_types is not None and set(cfg.attn_types) != {"global"}:
        return f"attn_types {sorted(set(cfg.attn_types))}"
    if cfg.original_architecture in POST_NORM_ARCHITECTURES or (cfg.original_architecture or "").startswith(
        "Olmo"
    ):
        return f"architecture {cfg.original_architecture}"
    return None


def _qkv_weight(attn: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Q, K and V projections as one ``(d_model, (H + 2 Hkv) d_head)`` matrix and its bias.

    Built on every call from the live parameters (a copy of 4 d_model x d_head x heads numbers, small
    next to a pass's matmuls), so nothing is duplicated and weight edits are always seen.
    """
    grouped = hasattr(attn, "_W_K")
    w_k, w_v = (attn._W_K, attn._W_V) if grouped else (attn.W_K, attn.W_V)
    b_k, b_v = (attn._b_K, attn._b_V) if grouped else (attn.b_K, attn.b_V)
    weights = [w.permute(1, 0, 2).reshape(w.shape[1], -1) for w in (attn.W_Q, w_k, w_v)]
    return torch.cat(weights, dim=1), torch.cat([b.reshape(-1) for b in (attn.b_Q, b_k, b_v)])


@dataclass
class LeanForward:
    """A model's blocks run the lean way; see the module docstring."""

    model: HookedTransformer

    @classmethod
    def of(cls, model: HookedTransformer) -> LeanForward | None:
        """The lean pass for ``model``, or ``None`` when unsupported or when it disagrees with
        TransformerLens on the model's own weights (see :meth:`max_difference`)."""
        if unsupported_reason(model) is not None:
            return None
        lean = cls(model)
        return lean if lean.max_difference() <= CHECK_TOLERANCE.get(model.cfg.dtype, 1e-4) else None

    @staticmethod
    def key_hook(layer: int, rotary: bool) -> str:
        """The hook whose keys the prefix takes: after the rotary embedding, as the lean pass caches them."""
        return f"blocks.{layer}.attn.hook_{'rot_k' if rotary else 'k'}"

    @property
    def rotary(self) -> bool:
        """Whether keys and queries are rotated (the prefix then holds rotated keys)."""
        return bool(self.model.cfg.positional_embedding_type == "rotary")

    def run(
        self,
        resid: torch.Tensor,
        start: int,
        stop: int,
        prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """The residual stream leaving block ``stop - 1`` given the one entering block ``start``.

        ``resid`` ``(B, P, d_model)`` holds positions ``s .. s+P-1``; ``prefix[i]`` is block
        ``start + i``'s keys (rotated) and values ``(B, s, n_kv_heads, d_head)`` at positions ``< s``.
        """
        if start >= stop:
            return resid
        offset = 0 if prefix is None else int(prefix[0][0].shape[1])
        mask = self._causal_mask(resid.shape[1], offset, resid.device)
        for i, layer in enumerate(range(start, stop)):
            past = None if prefix is None else prefix[i]
            resid = self._block(layer, resid, past, offset, mask)
        return resid

    def _causal_mask(self, length: int, offset: int, device: torch.device) -> torch.Tensor:
        """``(P, s + P)`` bool: query ``s + i`` attends to keys ``0 .. s + i``."""
        ones = torch.ones(length, offset + length, dtype=torch.bool, device=device)
        return ones.tril(diagonal=offset)

    def _block(
        self,
        layer: int,
        resid: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None,
        offset: int,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        block: Any = self.model.blocks[layer]
        resid = block.hook_resid_pre(resid)
        attn_out = block.hook_attn_out(self._attention(layer, block.ln1(resid), past, offset, mask))
        resid_mid = block.hook_resid_mid(resid + attn_out)
        mlp_out = block.hook_mlp_out(self._mlp(layer, block.ln2(resid_mid)))
        return block.hook_resid_post(resid_mid + mlp_out)

    def _attention(
        self,
        layer: int,
        x: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None,
        offset: int,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        cfg = self.model.cfg
        attn: Any = self.model.blocks[layer].attn
        batch, length, _ = x.shape
        heads, kv_heads, d_head = cfg.n_heads, cfg.n_key_value_heads or cfg.n_heads, cfg.d_head
        weight, bias = _qkv_weight(attn)
        qkv = torch.matmul(x, weight).add_(bias)  # (B, P, (H + 2 Hkv) d_head)
        q, k, v = qkv.split([heads * d_head, kv_heads * d_head, kv_heads * d_head], dim=-1)
        q = q.view(batch, length, heads, d_head)
        k = k.view(batch, length, kv_heads, d_head)
        v = v.view(batch, length, kv_heads, d_head)
        if self.rotary:
            q, k = attn.apply_rotary(q, offset), attn.apply_rotary(k, offset)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=1), torch.cat([past[1], v], dim=1)  # (B, s+P, Hkv, d_head)
        # Query head h reads key-value head h // group (TransformerLens' repeat_interleave). The
        # group's queries are stacked along the query axis, so no key or value is copied.
        group = heads // kv_heads
        q = q.view(batch, length, kv_heads, group, d_head).permute(0, 2, 3, 1, 4)  # (B, Hkv, G, P, dh)
        z = F.scaled_dot_product_attention(
            q.reshape(batch, kv_heads, group * length, d_head),
            k.transpose(1, 2),  # (B, Hkv, s+P, d_head)
            v.transpose(1, 2),
            attn_mask=mask.repeat(group, 1),  # (G P, s+P)
            scale=1.0 / attn.attn_scale,
        )  # (B, Hkv, G P, d_head)
        z = z.view(batch, kv_heads, group, length, d_head).permute(0, 3, 1, 2, 4)  # (B, P, Hkv, G, dh)
        w_out = attn.W_O.reshape(heads * d_head, -1)  # (H d_head, d_model)
        return torch.matmul(z.reshape(batch, length, heads * d_head), w_out).add_(attn.b_O)

    def _mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        # In-place updates only on fresh tensors no hook has seen: a new (B, P, d_mlp) tensor costs
        # page faults as well as a pass over memory.
        mlp: Any = self.model.blocks[layer].mlp
        if self.model.cfg.gated_mlp:
            gate = mlp.hook_pre(torch.matmul(x, mlp.W_gate))  # (B, P, d_mlp)
            linear = mlp.hook_pre_linear(torch.matmul(x, mlp.W_in))
            post = mlp.hook_post(mlp.act_fn(gate).mul_(linear).add_(mlp.b_in))
        else:
            post = mlp.hook_post(mlp.act_fn(mlp.hook_pre(torch.matmul(x, mlp.W_in).add_(mlp.b_in))))
        return torch.matmul(post, mlp.W_out).add_(mlp.b_out)

    def max_difference(self, n_passages: int = 2, length: int = 12, offset: int = 5) -> float:
        """Largest |lean - TransformerLens| over the final residual stream of random tokens (lean
        from position ``offset`` on, with the earlier keys and values as prefix), relative to the
        largest |TransformerLens activation|."""
        from analyses._sae_tensors import PADDING

        model = self.model
        n_layers = model.cfg.n_layers
        generator = torch.Generator().manual_seed(0)
        tokens = torch.randint(model.cfg.d_vocab, (n_passages, length), generator=generator)
        tokens = tokens.to(next(model.parameters()).device)
        hooks = {"blocks.0.hook_resid_pre"}
        for layer in range(n_layers):
            hooks |= {self.key_hook(layer, self.rotary), f"blocks.{layer}.attn.hook_v"}
        kept: dict[str, torch.Tensor] = {}

        def keep(act: torch.Tensor, hook: object) -> None:
            kept[getattr(hook, "name", "")] = act.detach()

        with torch.no_grad():
            reference = model.run_with_hooks(
                tokens,
                stop_at_layer=n_layers,
                padding_side=PADDING,
                fwd_hooks=[(name, keep) for name in sorted(hooks)],
            )[:, offset:]
            keys = [kept[self.key_hook(layer, self.rotary)] for layer in range(n_layers)]
            values = [kept[f"blocks.{layer}.attn.hook_v"] for layer in range(n_layers)]
            prefix = [(k[:, :offset], v[:, :offset]) for k, v in zip(keys, values, strict=True)]
            lean = self.run(kept["blocks.0.hook_resid_pre"][:, offset:], 0, n_layers, prefix)
        scale = float(reference.abs().max().clamp(min=1.0))
        return float((lean - reference).abs().max()) / scale
