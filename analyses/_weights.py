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
