"""Weight-editing helpers shared by the super-weight analyses.

A super weight is one entry of an MLP down projection. Papers and Hugging Face checkpoints index it
as ``mlp.down_proj.weight[row, col]`` (``row`` = output channel in d_model, ``col`` = input channel,
the neuron, in d_mlp). TransformerLens stores the same matrix transposed, ``W_out`` of shape
``(d_mlp, d_model)``, so the entry is ``model.blocks[layer].mlp.W_out[col, row]``. Every public name
here speaks the ``(layer, row, col)`` convention; the transposition happens in one place,
:meth:`SuperWeight.index`.

:func:`zeroed` edits weights in place and puts the original bits back when the block ends, even on
an exception. :func:`token_losses` and :func:`perplexity` measure a model on equal-length passages.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from runner.errors import ResourceError

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = [
    "TENSOR",
    "Edit",
    "SuperWeight",
    "down_proj",
    "hf_llama_view",
    "magnitude_controls",
    "neuron_edit",
    "perplexity",
    "random_controls",
    "token_losses",
    "zeroed",
]

TENSOR = "down_proj"
"""The name the outputs give the edited tensor (``mlp.down_proj`` in Hugging Face checkpoints)."""

PADDING = "right"
"""Passages are never padded; ``right`` keeps TransformerLens from masking tokens equal to the pad id."""

Progress = Callable[[Iterable[Any], int | None, str], Iterator[Any]]


@dataclass(frozen=True, order=True)
class SuperWeight:
    """One entry of layer ``layer``'s down projection: ``down_proj.weight[row, col]``."""

    layer: int
    row: int
    """Output channel (a d_model dimension of the residual stream)."""
    col: int
    """Input channel: the MLP neuron (a d_mlp dimension)."""

    def index(self) -> tuple[int, int]:
        """The entry's index in TransformerLens' ``W_out`` (``(d_mlp, d_model)``): ``(col, row)``."""
        return (self.col, self.row)

    def edit(self) -> Edit:
        """This single entry, as an :class:`Edit` for :func:`zeroed`."""
        return Edit(self.layer, self.index())

    def label(self) -> str:
        """``L11-R507-C1229``, as in the seed's file names."""
        return f"L{self.layer}-R{self.row}-C{self.col}"

    def as_dict(self) -> dict[str, int]:
        """``{"layer": ..., "row": ..., "col": ...}``."""
        return {"layer": self.layer, "row": self.row, "col": self.col}


@dataclass(frozen=True)
class Edit:
    """A region of layer ``layer``'s ``W_out`` to zero, as an index into that tensor."""

    layer: int
    index: tuple[Any, ...]


def neuron_edit(layer: int, col: int) -> Edit:
    """The whole output row of neuron ``col`` (``W_out[col, :]``): zeroing it silences the neuron."""
    return Edit(layer, (col, slice(None)))


def down_proj(model: HookedTransformer, layer: int) -> torch.nn.Parameter:
    """Layer ``layer``'s ``W_out`` (``(d_mlp, d_model)``), or a :class:`ResourceError` saying why not."""
    n_layers = model.cfg.n_layers
    if not 0 <= layer < n_layers:
        raise ResourceError(
            f"Layer {layer} does not exist: the model has {n_layers} layers (0-{n_layers - 1}).\n"
            "Use a layer within that range."
        )
    weight = getattr(model.blocks[layer].mlp, "W_out", None)
    if not isinstance(weight, torch.nn.Parameter) or weight.ndim != 2:
        raise ResourceError(
            f"Layer {layer}'s MLP ({type(model.blocks[layer].mlp).__name__}) has no single down projection "
            "W_out of shape (d_mlp, d_model); mixture-of-experts MLPs are not supported by this analysis.\n"
            "Use a dense model (Llama, Qwen2, GPT-2, OLMo, ...)."
        )
    return weight


@contextmanager
def zeroed(model: HookedTransformer, edits: Sequence[Edit | SuperWeight]) -> Iterator[None]:
    """Zero every region in ``edits`` for the block, then restore the original values bit for bit.

    Regions may overlap: values are saved before anything is zeroed and restored in reverse order,
    so the weights end exactly as they began.
    """
    regions = [e.edit() if isinstance(e, SuperWeight) else e for e in edits]
    saved: list[tuple[torch.nn.Parameter, tuple[Any, ...], torch.Tensor]] = []
    for region in regions:
        weight = down_proj(model, region.layer)
        saved.append((weight, region.index, weight.detach()[region.index].clone()))
    try:
        with torch.no_grad():
            for weight, index, _ in saved:
                weight[index] = 0
        yield
    finally:
        with torch.no_grad():
            for weight, index, original in reversed(saved):
                weight[index] = original


def token_losses(
    model: HookedTransformer,
    tokens: torch.Tensor,
    *,
    batch_size: int,
    progress: Progress | None = None,
    description: str = "perplexity",
) -> torch.Tensor:
    """Next-token cross-entropy at every position of every passage: ``(n, max_len - 1)`` float64.

    ``tokens`` is ``(n, max_len)``; passages are run in batches of ``batch_size`` with no padding.
    """
    device = next(model.parameters()).device
    batches: Iterable[torch.Tensor] = [tokens[i : i + batch_size] for i in range(0, len(tokens), batch_size)]
    if progress is not None:
        batches = progress(batches, -(-len(tokens) // batch_size), description)
    losses = []
    with torch.no_grad():
        for batch in batches:
            loss = model(batch.to(device), return_type="loss", loss_per_token=True, padding_side=PADDING)
            losses.append(loss.to("cpu", torch.float64))  # (B, max_len - 1)
    return torch.cat(losses)


def perplexity(losses: torch.Tensor) -> float:
    """``exp`` of the mean per-token loss (every predicted token weighs the same)."""
    return math.exp(float(losses.mean()))


def random_controls(
    model: HookedTransformer, weights: Sequence[SuperWeight], rng: np.random.Generator
) -> list[SuperWeight]:
    """One uniformly random coordinate of each weight's tensor, never a super weight, all distinct."""
    taken = set(weights)
    controls = []
    for weight in weights:
        d_mlp, d_model = down_proj(model, weight.layer).shape
        while True:
            candidate = SuperWeight(weight.layer, int(rng.integers(d_model)), int(rng.integers(d_mlp)))
            if candidate not in taken:
                break
        taken.add(candidate)
        controls.append(candidate)
    return controls


def magnitude_controls(model: HookedTransformer, weights: Sequence[SuperWeight]) -> list[SuperWeight]:
    """For each weight, the largest-|w| entry of its tensor that is neither a super weight nor taken."""
    taken = set(weights)
    controls = []
    for weight in weights:
        w_out = down_proj(model, weight.layer).detach()  # (d_mlp, d_model)
        order = torch.argsort(w_out.abs().flatten(), descending=True, stable=True)
        for flat in order.tolist():
            col, row = divmod(flat, w_out.shape[1])
            candidate = SuperWeight(weight.layer, row, col)
            if candidate not in taken:
                break
        taken.add(candidate)
        controls.append(candidate)
    return controls


def hf_llama_view(model: HookedTransformer) -> Any:
    """A transformers ``LlamaForCausalLM`` computing the same function as ``model`` (a Llama-architecture
    ``HookedTransformer`` with raw weights), for tools that need a transformers model (lm-eval).

    Its MLP down projections are views of ``model``'s ``W_out`` (``down_proj.weight = W_out.T``,
    sharing storage), so :func:`zeroed` on ``model`` edits both. The other weights are copies.
    """
    cfg = model.cfg
    if (
        cfg.original_architecture != "LlamaForCausalLM"
        or not cfg.gated_mlp
        or cfg.normalization_type != "RMS"
    ):
        raise ResourceError(
            f"Cannot build a transformers model from {cfg.model_name!r} ({cfg.original_architecture}): "
            "only Llama-architecture models (RMSNorm, gated MLP, rotary) convert back.\n"
            "Accuracy through lm-eval needs one; use a Llama-architecture model such as smollm2-135m, "
            "or leave `accuracy_tasks` empty."
        )
    from transformers import LlamaConfig, LlamaForCausalLM

    n_kv = cfg.n_key_value_heads or cfg.n_heads
    config = LlamaConfig(
        **_rope_kwargs(cfg, LlamaConfig),
        vocab_size=cfg.d_vocab,
        hidden_size=cfg.d_model,
        intermediate_size=int(cfg.d_mlp or 4 * cfg.d_model),
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=n_kv,
        head_dim=cfg.d_head,
        max_position_embeddings=cfg.n_ctx,
        rms_norm_eps=cfg.eps,
        hidden_act=cfg.act_fn,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
    )
    skip_init: Any = _no_init_weights()
    with skip_init:  # every weight is overwritten below; random init would take seconds
        hf = _construct(LlamaForCausalLM, config)
    hf = hf.to(device=cfg.device, dtype=cfg.dtype).eval()
    with torch.no_grad():
        _copy_llama_weights(model, hf, n_kv)
    return hf


def _rope_kwargs(cfg: Any, config_class: type) -> dict[str, Any]:
    """RoPE settings as ``LlamaConfig`` takes them: ``rope_parameters`` (transformers 5) or ``rope_theta``."""
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": float(cfg.rotary_base)}
    if cfg.use_NTK_by_parts_rope:
        params.update(
            rope_type="llama3",
            factor=cfg.NTK_by_parts_factor,
            low_freq_factor=cfg.NTK_by_parts_low_freq_factor,
            high_freq_factor=cfg.NTK_by_parts_high_freq_factor,
            original_max_position_embeddings=cfg.NTK_original_ctx_len,
        )
    if "rope_parameters" in inspect.signature(config_class).parameters:
        return {"rope_parameters": params}
    scaling = (
        None if params["rope_type"] == "default" else {k: v for k, v in params.items() if k != "rope_theta"}
    )
    return {"rope_theta": params["rope_theta"], "rope_scaling": scaling}


def _construct(model_class: Any, config: Any) -> Any:
    """``model_class(config)``; called through ``Any`` because mypy misreads transformers' decorators."""
    return model_class(config)


def _no_init_weights() -> Any:
    """transformers' context manager that skips random initialization (its module moved in 5.0)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights  # type: ignore[attr-defined,no-redef]
    return no_init_weights()


def _copy_llama_weights(model: HookedTransformer, hf: Any, n_kv: int) -> None:
    """The inverse of TransformerLens' ``convert_llama_weights``; down projections become shared views."""
    hf.model.embed_tokens.weight.copy_(model.embed.W_E)
    hf.model.norm.weight.copy_(model.ln_final.w)
    hf.lm_head.weight.copy_(model.unembed.W_U.T)
    for block, layer in zip(model.blocks, hf.model.layers, strict=True):
        attn = block.attn
        w_k = getattr(attn, "_W_K", attn.W_K)[:n_kv]  # (n_kv, d_model, d_head) with grouped-query attention
        w_v = getattr(attn, "_W_V", attn.W_V)[:n_kv]
        layer.self_attn.q_proj.weight.copy_(
            attn.W_Q.permute(0, 2, 1).reshape(-1, attn.W_Q.shape[1])
        )  # (n h) m
        layer.self_attn.k_proj.weight.copy_(w_k.permute(0, 2, 1).reshape(-1, w_k.shape[1]))
        layer.self_attn.v_proj.weight.copy_(w_v.permute(0, 2, 1).reshape(-1, w_v.shape[1]))
        layer.self_attn.o_proj.weight.copy_(attn.W_O.reshape(-1, attn.W_O.shape[-1]).T)  # m (n h)
        layer.input_layernorm.weight.copy_(block.ln1.w)
        layer.post_attention_layernorm.weight.copy_(block.ln2.w)
        layer.mlp.gate_proj.weight.copy_(block.mlp.W_gate.T)
        layer.mlp.up_proj.weight.copy_(block.mlp.W_in.T)
        layer.mlp.down_proj.weight = torch.nn.Parameter(block.mlp.W_out.T, requires_grad=False)  # shared
