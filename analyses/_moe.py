"""Mixture-of-experts helpers for the super-weight analyses: which layers are MoE, routing, per-expert spikes.

TransformerLens 3.9 builds a mixture-of-experts MLP (``MoE`` for Mixtral and OLMoE, ``GptOssMoE`` for
GPT-OSS) as a router ``mlp.W_gate`` (``nn.Linear(d_model, num_experts)``) and a list of gated-MLP
experts ``mlp.experts[e]``, each with its own down projection ``W_out = nn.Linear(d_mlp, d_model)``.
An expert's entry ``(row, col)`` is a :class:`analyses._weights.SuperWeight` with ``expert=e``, which
knows where it is stored (:mod:`analyses._weights` says how that differs from a dense layer).

Routing is read from the block's own hooks: ``hook_expert_indices`` (``(batch * pos, k)``, the
selected experts of each token) and ``hook_expert_weights`` (``(batch * pos, num_experts)``: the
router softmax over every expert for Mixtral/OLMoE; the top-k routing weights, zero elsewhere, for
GPT-OSS). Each expert receives its tokens in the order of ``torch.where(indices.T == e)``, i.e. the
tokens that chose it first, then those that chose it second, as TransformerLens' loop feeds them;
:func:`routed_tokens` reproduces that order so an expert's activations map back to positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from analyses._weights import largest_entry

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = [
    "ExpertPeak",
    "RouterCounts",
    "experts_of",
    "is_moe_block",
    "measure_expert_peaks",
    "measure_router",
    "moe_layers",
    "routed_tokens",
]


def is_moe_block(mlp: Any) -> bool:
    """Whether a block's MLP is a TransformerLens mixture of experts (router + list of experts)."""
    experts = getattr(mlp, "experts", None)
    return isinstance(experts, torch.nn.ModuleList) and hasattr(mlp, "hook_expert_indices")


def experts_of(model: HookedTransformer, layer: int) -> list[Any]:
    """The experts of a MoE layer (``blocks[layer].mlp.experts``), each with a ``W_out`` ``nn.Linear``."""
    experts: Any = model.blocks[layer].mlp.experts
    return list(experts)


def moe_layers(model: HookedTransformer) -> list[int]:
    """The layers whose MLP is a mixture of experts (empty for a dense model)."""
    return [i for i, block in enumerate(model.blocks) if is_moe_block(block.mlp)]


def routed_tokens(indices: torch.Tensor, expert: int) -> torch.Tensor:
    """Flat token indices (into ``batch * pos``) routed to ``expert``, in the order the expert sees them.

    ``indices`` is ``hook_expert_indices`` (``(batch * pos, k)``). TransformerLens builds
    ``one_hot(indices).permute(2, 1, 0)[expert]`` (``(k, batch * pos)``) and takes ``torch.where`` of
    it: slot-major, then token order. ``indices.T == expert`` is that same mask.
    """
    _, tokens = torch.where(indices.T.eq(expert))  # (n_routed,)
    return tokens


# --- router statistics --------------------------------------------------------------------------------------


@dataclass
class RouterCounts:
    """Routing of one layer over some tokens: how often each expert is selected, and its mean probability."""

    n_experts: int
    n_tokens: int = 0
    selected: torch.Tensor = field(init=False)
    """``(n_experts,)`` float64: tokens that selected each expert (any of the top-k slots)."""
    top1: torch.Tensor = field(init=False)
    """``(n_experts,)`` float64: tokens whose first choice was each expert."""
    prob_sum: torch.Tensor = field(init=False)
    """``(n_experts,)`` float64: sum over tokens of ``hook_expert_weights``."""

    def __post_init__(self) -> None:
        self.selected = torch.zeros(self.n_experts, dtype=torch.float64)
        self.top1 = torch.zeros(self.n_experts, dtype=torch.float64)
        self.prob_sum = torch.zeros(self.n_experts, dtype=torch.float64)

    def add(self, indices: torch.Tensor, probs: torch.Tensor) -> None:
        """Add one forward pass: ``indices`` ``(N, k)``, ``probs`` ``(N, n_experts)``."""
        indices = indices.detach().cpu()
        flat = indices.reshape(-1)
        self.selected += torch.bincount(flat, minlength=self.n_experts).double()
        self.top1 += torch.bincount(indices[:, 0], minlength=self.n_experts).double()
        self.prob_sum += probs.detach().to("cpu", torch.float64).sum(0)
        self.n_tokens += int(indices.shape[0])

    def p_active(self) -> torch.Tensor:
        """Fraction of tokens that select each expert; sums to ``experts_per_token`` over experts."""
        return self.selected / max(self.n_tokens, 1)


def measure_router(
    model: HookedTransformer, batches: Sequence[torch.Tensor], layers: Sequence[int]
) -> dict[int, RouterCounts]:
    """Routing counts of ``layers`` over every token of ``batches`` (each ``(B, pos)``)."""
    counts = {layer: RouterCounts(len(experts_of(model, layer))) for layer in layers}
    pending: dict[int, torch.Tensor] = {}

    def probs_hook(probs: torch.Tensor, hook: Any) -> None:
        pending[_layer_of(hook.name)] = probs.detach()

    def indices_hook(indices: torch.Tensor, hook: Any) -> None:
        layer = _layer_of(hook.name)
        counts[layer].add(indices, pending.pop(layer))

    hooks: list[tuple[str | Any, Any]] = []
    for layer in layers:
        hooks.append((f"blocks.{layer}.mlp.hook_expert_weights", probs_hook))
        hooks.append((f"blocks.{layer}.mlp.hook_expert_indices", indices_hook))
    device = next(model.parameters()).device
    with torch.no_grad():
        for batch in batches:
            model.run_with_hooks(
                batch.to(device), return_type=None, stop_at_layer=max(layers) + 1, fwd_hooks=hooks
            )
    return counts


def _layer_of(hook_name: str) -> int:
    return int(hook_name.split(".")[1])  # blocks.{layer}.mlp.hook_...


# --- per-expert spikes --------------------------------------------------------------------------------------


@dataclass
class ExpertPeak:
    """The largest |input| and |output| of one expert's down projection over the tokens routed to it.

    Positions are ``(row of the batch, position)`` of the forward pass that produced them; the caller
    gives them meaning (probe or passage).
    """

    n_routed: int
    input_value: float
    """Signed value of the largest-|·| entry of the expert's ``W_out`` input (``hook_post``)."""
    input_at: tuple[int, int]
    input_channel: int
    """The expert's neuron (d_mlp index): the candidate's ``col``."""
    output_value: float
    """Signed value of the largest-|·| entry of the expert's ``W_out`` output (before routing weights)."""
    output_at: tuple[int, int]
    output_channel: int
    """The residual channel (d_model index): the candidate's ``row``."""
    input_at_output: torch.Tensor
    """``(d_mlp,)`` float32: the expert's ``W_out`` input at the output spike's token (for co-spikes)."""
    input_source: int = 0
    """Which forward pass (index into the batches given to :func:`measure_expert_peaks`) the input spike
    is from."""
    output_source: int = 0
    """Which forward pass the output spike is from."""

    def merged(self, other: ExpertPeak) -> ExpertPeak:
        """Both measurements together: each side keeps the larger peak; routed tokens add up."""
        use_in = abs(other.input_value) > abs(self.input_value)
        use_out = abs(other.output_value) > abs(self.output_value)
        inp, out = (other if use_in else self), (other if use_out else self)
        return ExpertPeak(
            self.n_routed + other.n_routed,
            inp.input_value,
            inp.input_at,
            inp.input_channel,
            out.output_value,
            out.output_at,
            out.output_channel,
            out.input_at_output,
            inp.input_source,
            out.output_source,
        )


def measure_expert_peaks(
    model: HookedTransformer, batches: Sequence[torch.Tensor], layers: Sequence[int]
) -> dict[tuple[int, int], ExpertPeak]:
    """Per ``(layer, expert)``: the down projection's input and output peaks over its routed tokens.

    ``batches`` are ``(B, pos)`` token tensors run one by one; the peaks of each are merged and
    ``input_source`` / ``output_source`` say which batch each side came from. Experts no token was
    routed to are absent. The model's weights are used as they are now (zero some first to iterate).
    """
    peaks: dict[tuple[int, int], ExpertPeak] = {}
    for source, batch in enumerate(batches):
        for key, peak in _measure_batch(model, batch, layers).items():
            peak.input_source = peak.output_source = source
            peaks[key] = peaks[key].merged(peak) if key in peaks else peak
    return peaks


def _measure_batch(
    model: HookedTransformer, tokens: torch.Tensor, layers: Sequence[int]
) -> dict[tuple[int, int], ExpertPeak]:
    """One forward pass over ``tokens`` (``(B, pos)``) recording every routed expert's peaks."""
    n_pos = tokens.shape[1]
    routing: dict[int, torch.Tensor] = {}
    peaks: dict[tuple[int, int], ExpertPeak] = {}

    def remember_routing(indices: torch.Tensor, hook: Any) -> None:
        routing[_layer_of(hook.name)] = indices.detach()

    def record(layer: int, expert: int) -> Any:
        def hook(module: Any, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            post = inputs[0].detach().float()  # (n_routed, d_mlp)
            out = output.detach().float()  # (n_routed, d_model)
            if post.shape[0] == 0:
                return
            tokens_of = routed_tokens(routing[layer], expert)  # (n_routed,)
            assert len(tokens_of) == post.shape[0], (
                f"layer {layer} expert {expert}: {post.shape[0]} rows, routing says {len(tokens_of)}"
            )
            in_value, in_row, in_channel = largest_entry(post)
            out_value, out_row, out_channel = largest_entry(out)
            peaks[(layer, expert)] = ExpertPeak(
                n_routed=post.shape[0],
                input_value=in_value,
                input_at=divmod(int(tokens_of[in_row]), n_pos),
                input_channel=in_channel,
                output_value=out_value,
                output_at=divmod(int(tokens_of[out_row]), n_pos),
                output_channel=out_channel,
                input_at_output=post[out_row].cpu(),
            )

        return hook

    handles = [
        module.W_out.register_forward_hook(record(layer, expert))
        for layer in layers
        for expert, module in enumerate(experts_of(model, layer))
    ]
    hooks: list[tuple[str | Any, Any]] = [
        (f"blocks.{layer}.mlp.hook_expert_indices", remember_routing) for layer in layers
    ]
    try:
        with torch.no_grad():
            model.run_with_hooks(
                tokens.to(next(model.parameters()).device),
                return_type=None,
                stop_at_layer=max(layers) + 1,
                fwd_hooks=hooks,
            )
    finally:
        for handle in handles:
            handle.remove()
    return peaks
