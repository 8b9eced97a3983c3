"""A lean forward pass through a ``HookedTransformer``'s blocks, for the fast path of interventions.

TransformerLens' blocks are written for hooks and readability. Its gated MLP and attention copy
their weight matrices on every call (``W.T.contiguous()``, ``rearrange(W_O).contiguous()``);
grouped-query attention repeats keys and values for every query head; attention builds its
scores, causal mask and pattern one elementwise pass at a time; the rotary embedding takes eight
passes over the queries and keys (a clone, two strided copies, a negation, two products, a sum, a
concatenation); and every bias is added, though most models' are zero. The fast path of
``sae_interventions`` runs hundreds of thousands of token-blocks, so it runs the same blocks with:

- weights used as they are stored (``x @ W``: the matmul reads the transposed layout directly),
  except the Q, K and V projections, copied into one matrix (under a quarter of a block's weights,
  kept while they are unchanged) so that they take one matmul;
- the rotary embedding of queries and keys together, in three passes, with the same products and
  sums as TransformerLens' (``x cos - x' sin``, ``x' cos + x sin``) and its own sine and cosine tables;
- attention by ``F.scaled_dot_product_attention``, with a prefix of cached keys and values (the
  rows' unchanged positions) and the causal mask offset by its length; grouped-query heads share
  their key-value head without copies;
- biases that are all zeros not added (checked again whenever a bias changes), and the gated MLP's
  SiLU applied in place when no hook has seen its input;
- TransformerLens' own norms and activation functions.

The block-level hook points are called where TransformerLens calls them (``hook_resid_pre``,
``hook_attn_out``, ``hook_resid_mid``, the MLP's ``hook_pre`` / ``hook_pre_linear`` / ``hook_post``,
``hook_mlp_out``, ``hook_resid_post``), so hooks on them edit the lean pass as they edit
TransformerLens' own; :meth:`LeanForward.run` also takes ``edits`` by hook name, applied at the same
points without registering a hook on the model (so that several threads can run different edits at
once). Hooks inside attention (``hook_q``, ``hook_k``, ``hook_v``, ``hook_rot_q``, ``hook_rot_k``,
``hook_attn_scores``, ``hook_pattern``, ``hook_z``, ``hook_result``) are not called.

``benchmarks/interventions.py`` and ``benchmarks/importance.py`` measure it against TransformerLens'
blocks and against transformers (figures, with the CPU they ran on, in ``benchmarks/README.md``).

Only configurations whose every feature is covered here are accepted (:func:`unsupported_reason`),
and :meth:`LeanForward.refusal` checks the lean pass against TransformerLens' forward on the model's
own weights before it is used (for 16-bit models also on a random float32 model of the same
architecture, where rounding cannot hide a mistake). The two agree to float32 rounding (matmul
blocking and softmax order differ), not bit for bit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from runner.step import StepContext

__all__ = [
    "Edits",
    "LeanForward",
    "check_key",
    "checked_lean_forward",
    "remembered_refusal",
    "unsupported_reason",
]

Edits = Mapping[str, Callable[[torch.Tensor], torch.Tensor]]
"""Edits by hook name (``blocks.3.hook_mlp_out``): each takes the activation there and returns its
replacement, as a TransformerLens hook would."""

CHECK_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-4, torch.float16: 0.1, torch.bfloat16: 0.1}
"""Largest difference from TransformerLens the check accepts, per dtype: the largest over positions
of |lean - TransformerLens| / |TransformerLens| (L2 norms of the final residual stream). float32
rounding gives 1e-6 to 3e-6 (SmolLM2-135M: 2e-6); 16-bit rounding reaches several percent (SmolLM2
in bfloat16: 3%, random bfloat16 models: up to 5%), which is why 16-bit models are also checked on
a float32 model of the same architecture."""
TWIN_LAYERS = 2
TWIN_VOCAB = 512
"""The float32 model of a 16-bit model's architecture: this many layers and tokens, every other
setting the model's own, every block weight random."""


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
    flags["n_devices > 1"] = cfg.n_devices > 1  # the residual would have to move between devices
    on = [name for name, value in flags.items() if value]
    if on:
        return f"TransformerLens config sets {', '.join(on)}"
    if cfg.positional_embedding_type not in ("standard", "rotary"):
        return f"positional_embedding_type {cfg.positional_embedding_type!r}"
    if cfg.attention_dir != "causal":
        return f"attention_dir {cfg.attention_dir!r}"
    if cfg.attn_types is not None and set(cfg.attn_types) != {"global"}:
        return f"attn_types {sorted(set(cfg.attn_types))}"
    architecture = cfg.original_architecture or ""
    if architecture in POST_NORM_ARCHITECTURES or architecture.startswith("Olmo"):  # post-norm, QK norm
        return f"architecture {architecture}"
    return None


def _qkv_parts(attn: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The live Q, K and V weights ``(heads, d_model, d_head)`` and biases (grouped K and V unrepeated)."""
    grouped = hasattr(attn, "_W_K")
    w_k, w_v = (attn._W_K, attn._W_V) if grouped else (attn.W_K, attn.W_V)
    b_k, b_v = (attn._b_K, attn._b_V) if grouped else (attn.b_K, attn.b_V)
    return [attn.W_Q, w_k, w_v], [attn.b_Q, b_k, b_v]


def _version(tensors: list[torch.Tensor]) -> tuple[tuple[int, int], ...]:
    """Where each tensor's storage is and how often it was changed in place: equal while unchanged."""
    return tuple((t.data_ptr(), t._version) for t in tensors)


def _point(point: Any, x: torch.Tensor, edits: Edits) -> torch.Tensor:
    """``x`` through a block's hook point (its hooks, if any), then the edit named after it."""
    x = point(x)
    edit = edits.get(point.name) if edits else None
    return x if edit is None else edit(x)


def _hooked(point: Any) -> bool:
    """Whether a hook is registered on ``point`` (it may keep the tensor it sees)."""
    return bool(point._forward_hooks or point.fwd_hooks)


def checked_lean_forward(ctx: StepContext, model: HookedTransformer, instead: str) -> LeanForward | None:
    """The lean forward of ``model``, checked once per run against TransformerLens' forward (a passed
    check is remembered across runs, see :func:`remembered_refusal`); ``None`` where it must not
    run, with a note saying why and what runs ``instead``."""
    refusal = ctx.cached(("lean_forward_refusal", model), lambda: remembered_refusal(ctx, model))
    if refusal is not None:
        ctx.note(f"{instead}, not the lean forward: {refusal}.")
        return None
    return LeanForward(model)


def remembered_refusal(
    ctx: StepContext, model: HookedTransformer, cache_dir: Path | None = None
) -> str | None:
    """:meth:`LeanForward.refusal`, with a passed check remembered in ``cache_dir/lean-forward/``
    (default: the weight cache's folder) under :func:`check_key`: the check is one computation of
    those inputs, so it passes again. A refusal is never stored (it may come from a passing cause,
    and the slow path it selects is checked every run); nor is anything for a model of unknown
    weights."""
    key = check_key(ctx, model)
    if key is None:
        return LeanForward.refusal(model)
    from runner.models.weight_cache import default_cache_dir

    path = (cache_dir or default_cache_dir()) / "lean-forward" / f"{key[:32]}.json"
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text()) == {"key": key, "passed": True}:
            return None
    refusal = LeanForward.refusal(model)
    if refusal is None:
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"key": key, "passed": True}))
            os.replace(tmp, path)
    return refusal


def check_key(ctx: StepContext, model: HookedTransformer) -> str | None:
    """sha256 of everything :meth:`LeanForward.refusal` depends on, or ``None`` when ``model`` is not the
    case's own model loaded from a file of known sha256 (its weights could be anything).

    The weights' sha256 and weight-cache format, the model's whole TransformerLens config (dtype and
    device included), this file's source, the torch and TransformerLens versions, and the CPU
    instruction set torch's kernels use (they round differently).
    """
    from runner.errors import RunnerError

    try:
        loaded = ctx.model
    except RunnerError:
        return None
    sha256 = loaded.info.get("sha256") if loaded.model is model else None
    if not isinstance(sha256, str):
        return None
    from runner.models.naming import package_version
    from runner.models.weight_cache import CACHE_FORMAT

    inputs = {
        "weights_sha256": sha256,
        "weight_cache_format": CACHE_FORMAT,
        "config": repr(sorted(model.cfg.to_dict().items())),
        "lean_forward_sha256": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
        "versions": {p: package_version(p) for p in ("torch", "transformer-lens")},
        "cpu": torch.backends.cpu.get_cpu_capability(),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


@dataclass
class LeanForward:
    """A model's blocks run the lean way; see the module docstring."""

    model: HookedTransformer
    _zero: dict[int, tuple[tuple[int, int], bool]] = field(default_factory=dict, repr=False, compare=False)
    _qkv: dict[int, tuple[tuple[tuple[int, int], ...], torch.Tensor]] = field(
        default_factory=dict, repr=False, compare=False
    )
    """Per attention layer (by ``id``): its weights' versions and their ``(d_model, (H + 2 Hkv) d_head)``
    concatenation, rebuilt whenever a weight changes (storage or in-place version)."""
    """Per bias parameter (by ``id``): its (storage, version) when last checked, and whether it was
    all zeros then."""

    @classmethod
    def of(cls, model: HookedTransformer) -> LeanForward | None:
        """The lean pass for ``model``, or ``None`` where :meth:`refusal` gives a reason."""
        return None if cls.refusal(model) is not None else cls(model)

    @classmethod
    def refusal(cls, model: HookedTransformer) -> str | None:
        """Why the lean pass must not run ``model`` (an unsupported configuration, or a difference
        from TransformerLens' forward above :data:`CHECK_TOLERANCE`), or ``None``."""
        reason = unsupported_reason(model)
        if reason is not None:
            return reason
        checks: list[tuple[str, Callable[[], HookedTransformer]]] = [("", lambda: model)]
        if model.cfg.dtype not in (torch.float32, torch.float64):
            twin = "on a random float32 model of the same architecture, "
            checks.append((twin, lambda: _float32_twin(model)))
        for where, build in checks:
            try:
                checked = build()
                error = cls(checked).max_difference()
            except Exception as exc:  # any failure means: run TransformerLens' own blocks instead
                return f"checking it against TransformerLens' forward {where}raised {exc!r}"
            tolerance = CHECK_TOLERANCE.get(checked.cfg.dtype, 1e-4)
            if not error <= tolerance:  # NaN fails too
                return (
                    f"{where}it differed from TransformerLens' forward by {error:.2g} "
                    f"(relative; at most {tolerance:g} allowed)"
                )
        return None

    def key_hook(self, layer: int) -> str:
        """The hook whose keys the prefix takes: after the rotary embedding, as the lean pass caches them."""
        return f"blocks.{layer}.attn.hook_{'rot_k' if self.rotary else 'k'}"

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
        *,
        edits: Edits | None = None,
        keep_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """The residual stream leaving block ``stop - 1`` given the one entering block ``start``.

        ``resid`` ``(B, P, d_model)`` holds positions ``s .. s+P-1``; ``prefix[i]`` is block
        ``start + i``'s keys (rotated) and values ``(B, s, n_kv_heads, d_head)`` at positions ``< s``.
        ``edits`` apply at block hook points (see :data:`Edits`); ``keep_kv``, when given, receives
        each block's keys (rotated) and values ``(B, P, n_kv_heads, d_head)`` of positions ``s..``.
        """
        if start >= stop:
            return resid
        offset = 0 if prefix is None else int(prefix[0][0].shape[1])
        cfg = self.model.cfg
        group = cfg.n_heads // (cfg.n_key_value_heads or cfg.n_heads)
        mask = self._causal_mask(resid.shape[1], offset, resid.device).repeat(group, 1)  # (G P, s+P)
        for i, layer in enumerate(range(start, stop)):
            past = None if prefix is None else prefix[i]
            resid = self._block(layer, resid, past, offset, mask, edits or {}, keep_kv)
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
        edits: Edits,
        keep_kv: list[tuple[torch.Tensor, torch.Tensor]] | None,
    ) -> torch.Tensor:
        block: Any = self.model.blocks[layer]
        resid = _point(block.hook_resid_pre, resid, edits)
        attention = self._attention(layer, block.ln1(resid), past, offset, mask, keep_kv)
        resid_mid = _point(block.hook_resid_mid, resid + _point(block.hook_attn_out, attention, edits), edits)
        mlp_out = _point(block.hook_mlp_out, self._mlp(layer, block.ln2(resid_mid), edits), edits)
        return _point(block.hook_resid_post, resid_mid + mlp_out, edits)

    def _attention(
        self,
        layer: int,
        x: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None,
        offset: int,
        mask: torch.Tensor,
        keep_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        cfg = self.model.cfg
        attn: Any = self.model.blocks[layer].attn
        batch, length, _ = x.shape
        heads, kv_heads, d_head = cfg.n_heads, cfg.n_key_value_heads or cfg.n_heads, cfg.d_head
        weight, biases = self._qkv_weight(attn)
        qkv = torch.matmul(x, weight)  # (B, P, (H + 2 Hkv) d_head)
        if any(self._nonzero(b) is not None for b in biases):
            qkv.add_(torch.cat([b.reshape(-1) for b in biases]))
        qk = qkv[..., : (heads + kv_heads) * d_head].view(batch, length, heads + kv_heads, d_head)
        if self.rotary:
            qk = self._rotate(attn, qk, offset)  # a fresh (B, P, H + Hkv, d_head) tensor
        q, k = qk[:, :, :heads], qk[:, :, heads:]
        v = qkv[..., (heads + kv_heads) * d_head :].view(batch, length, kv_heads, d_head)
        if keep_kv is not None:
            keep_kv.append((k.contiguous(), v.contiguous()))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=1), torch.cat([past[1], v], dim=1)  # (B, s+P, Hkv, d_head)
        # Query head h reads key-value head h // group (TransformerLens' repeat_interleave). The
        # group's queries are stacked along the query axis, so no key or value is copied.
        group = heads // kv_heads
        q = q.reshape(batch, length, kv_heads, group, d_head).permute(0, 2, 3, 1, 4)  # (B, Hkv, G, P, dh)
        z = F.scaled_dot_product_attention(
            q.reshape(batch, kv_heads, group * length, d_head),
            k.transpose(1, 2),  # (B, Hkv, s+P, d_head)
            v.transpose(1, 2),
            attn_mask=mask,  # (G P, s+P)
            scale=1.0 / attn.attn_scale,
        )  # (B, Hkv, G P, d_head)
        z = z.view(batch, kv_heads, group, length, d_head).permute(0, 3, 1, 2, 4)  # (B, P, Hkv, G, dh)
        w_out = attn.W_O.reshape(heads * d_head, -1)  # (H d_head, d_model)
        return self._biased(torch.matmul(z.reshape(batch, length, heads * d_head), w_out), attn.b_O)

    def _qkv_weight(self, attn: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Q, K and V projections as one ``(d_model, (H + 2 Hkv) d_head)`` matrix, and their biases.

        Kept between passes while the weights are unchanged (a fresh 2 MB copy per layer and pass
        costs page faults as well as the copy); built anew from the live parameters after any edit,
        and whenever gradients may flow to them.
        """
        weights, biases = _qkv_parts(attn)
        grads = torch.is_grad_enabled() and any(w.requires_grad for w in weights)
        version = _version(weights)
        known = None if grads else self._qkv.get(id(attn))
        if known is not None and known[0] == version:
            return known[1], biases
        joined = torch.cat([w.permute(1, 0, 2).reshape(w.shape[1], -1) for w in weights], dim=1)
        if not grads:
            self._qkv[id(attn)] = (version, joined)
        return joined, biases

    def _rotate(self, attn: Any, x: torch.Tensor, offset: int) -> torch.Tensor:
        """TransformerLens' rotary embedding (``apply_rotary``) of ``x`` ``(B, P, heads, d_head)`` at
        positions ``offset..``, as a new tensor: the same products and sums in three passes.

        Query and key heads go together. Adjacent-pair rotation (GPT-J) and positions past the tables
        (which TransformerLens would extend) take ``apply_rotary`` itself, as do tables of another
        dtype than ``x``.
        """
        cfg = self.model.cfg
        length = x.shape[1]
        dim = cfg.rotary_dim if cfg.rotary_dim is not None else x.shape[-1]
        tables = attn.rotary_cos.shape[0], attn.rotary_cos.dtype
        if cfg.rotary_adjacent_pairs or offset + length > tables[0] or tables[1] != x.dtype:
            return torch.cat(  # apply_rotary's q and k, one at a time, as TransformerLens calls it
                [
                    attn.apply_rotary(x[:, :, : cfg.n_heads], offset),
                    attn.apply_rotary(x[:, :, cfg.n_heads :], offset),
                ],
                dim=2,
            )
        cos = attn.rotary_cos[offset : offset + length, None, :]  # (P, 1, rotary_dim)
        sin = attn.rotary_sin[offset : offset + length, None, :]
        half = dim // 2
        if torch.is_grad_enabled() and x.requires_grad:  # ``out=`` calls do not record a graph
            rotated = [
                x[..., :half] * cos[..., :half] - x[..., half:dim] * sin[..., :half],
                x[..., half:dim] * cos[..., half:] + x[..., :half] * sin[..., half:],
                x[..., dim:],
            ]
            return torch.cat(rotated, dim=-1)
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        torch.mul(x[..., :dim], cos, out=out[..., :dim])
        # TransformerLens adds (-x2, x1) * sin: the same numbers as subtracting x2 sin, adding x1 sin
        out[..., :half].addcmul_(x[..., half:dim], sin[..., :half], value=-1)
        out[..., half:dim].addcmul_(x[..., :half], sin[..., half:])
        if dim < x.shape[-1]:
            out[..., dim:] = x[..., dim:]
        return out

    def _mlp(self, layer: int, x: torch.Tensor, edits: Edits | None = None) -> torch.Tensor:
        # In-place updates only on fresh tensors no hook has seen: a new (B, P, d_mlp) tensor costs
        # page faults as well as a pass over memory.
        mlp: Any = self.model.blocks[layer].mlp
        edits = edits or {}
        if self.model.cfg.gated_mlp:
            fresh = torch.matmul(x, mlp.W_gate)  # (B, P, d_mlp)
            gate = _point(mlp.hook_pre, fresh, edits)
            linear = _point(mlp.hook_pre_linear, torch.matmul(x, mlp.W_in), edits)
            if mlp.act_fn is F.silu and gate is fresh and not _hooked(mlp.hook_pre):
                act = F.silu(gate, inplace=True)
            else:
                act = mlp.act_fn(gate)
            post = _point(mlp.hook_post, self._biased(act.mul_(linear), mlp.b_in), edits)
        else:
            pre = _point(mlp.hook_pre, self._biased(torch.matmul(x, mlp.W_in), mlp.b_in), edits)
            post = _point(mlp.hook_post, mlp.act_fn(pre), edits)
        return self._biased(torch.matmul(post, mlp.W_out), mlp.b_out)

    def _biased(self, fresh: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``fresh + bias`` in place, or ``fresh`` itself when the bias is all zeros."""
        return fresh if self._nonzero(bias) is None else fresh.add_(bias)

    def _nonzero(self, bias: torch.Tensor) -> torch.Tensor | None:
        """``bias``, or ``None`` when it is all zeros: adding it would cost a pass and change nothing.
        Checked again whenever the parameter changes (its storage or its in-place version)."""
        state = (bias.data_ptr(), bias._version)
        known = self._zero.get(id(bias))
        if known is None or known[0] != state:
            known = self._zero[id(bias)] = (state, not bool(bias.any()))
        return None if known[1] else bias

    def max_difference(self, n_passages: int = 2, length: int = 12, offset: int = 5) -> float:
        """Largest over positions of ``|lean - TransformerLens| / |TransformerLens|`` (L2 norms of the
        final residual stream) on random tokens, lean from position ``offset`` on with the earlier
        keys and values as its prefix. Per position, so that a few massive activations (at the first
        position, or in a few channels) cannot hide an error elsewhere."""
        from analyses._sae_tensors import capture

        model = self.model
        n_layers = model.cfg.n_layers
        length = min(length, model.cfg.n_ctx)
        offset = min(offset, length // 2)
        generator = torch.Generator().manual_seed(0)
        tokens = torch.randint(model.cfg.d_vocab, (n_passages, length), generator=generator)
        tokens = tokens.to(next(model.parameters()).device)
        hooks = ["blocks.0.hook_resid_pre"]
        for layer in range(n_layers):
            hooks += [self.key_hook(layer), f"blocks.{layer}.attn.hook_v"]
        kept, reference = capture(model, tokens, hooks, stop_at_layer=n_layers)
        assert reference is not None
        prefix = [
            (kept[self.key_hook(layer)][:, :offset], kept[f"blocks.{layer}.attn.hook_v"][:, :offset])
            for layer in range(n_layers)
        ]
        with torch.no_grad():
            lean = self.run(kept["blocks.0.hook_resid_pre"][:, offset:], 0, n_layers, prefix)
        reference = reference[:, offset:]
        error = (lean - reference).float().norm(dim=-1)  # (B, P)
        return float((error / reference.float().norm(dim=-1).clamp(min=1e-6)).max())


def _float32_twin(model: HookedTransformer) -> HookedTransformer:
    """A small float32 ``HookedTransformer`` with ``model``'s configuration (see :data:`TWIN_LAYERS`),
    on the CPU, every block parameter random (not TransformerLens' zero biases and unit norms)."""
    import dataclasses

    from transformer_lens import HookedTransformer

    cfg = model.cfg
    twin_cfg = dataclasses.replace(
        cfg,
        n_layers=min(TWIN_LAYERS, cfg.n_layers),
        d_vocab=min(TWIN_VOCAB, cfg.d_vocab),
        d_vocab_out=-1,
        dtype=torch.float32,
        device="cpu",
        n_devices=1,
        tokenizer_name=None,  # built without a tokenizer: nothing is downloaded
        attn_types=None if cfg.attn_types is None else cfg.attn_types[:TWIN_LAYERS],
        seed=0,
    )
    twin = HookedTransformer(twin_cfg).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in twin.named_parameters():
            if name.startswith("blocks."):
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)
    return twin
