"""Entries of MLP down projections, dense or of one expert, and what the super-weight analyses do with them.

A super weight is one entry of an MLP down projection. Papers and Hugging Face checkpoints index it
as ``mlp.down_proj.weight[row, col]`` (``row`` = output channel in d_model, ``col`` = input channel,
the neuron, in d_mlp), and an expert's alike, ``mlp.experts[e].down_proj.weight[row, col]``.
TransformerLens stores a dense down projection transposed, ``blocks[L].mlp.W_out`` of shape
``(d_mlp, d_model)``, so the entry is ``W_out[col, row]``; it stores an expert's as Hugging Face
does, ``blocks[L].mlp.experts[e].W_out.weight`` of shape ``(d_model, d_mlp)``, entry ``[row, col]``.
Every public name here speaks ``(layer, row, col)`` (and ``expert``, None in a dense layer); the
transposition happens in one place, :func:`_stored_order`.

A :class:`Region` is a part of one down projection: a :class:`SuperWeight` is one entry (a super
weight, a candidate or a control), a :class:`Neuron` a neuron's whole output. :func:`zeroed` edits
regions in place and puts the original bits back when the block ends, even on an exception.
:func:`random_controls` and :func:`magnitude_controls` pick matched ordinary entries.
:class:`Perplexities` measures a model on equal-length passages with regions zeroed, and
:func:`measure_impact` the paper's conditions with it. :func:`detect` is the paper's iterative loop
around any spike measurement.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, Protocol, TypeVar

import numpy as np
import torch

from runner.errors import ResourceError

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from runner.step import StepContext

__all__ = [
    "PADDING",
    "TENSOR",
    "ControlImpact",
    "Detection",
    "Found",
    "Impact",
    "Neuron",
    "Perplexities",
    "Region",
    "Restored",
    "Spike",
    "SuperWeight",
    "detect",
    "down_proj",
    "largest_entry",
    "magnitude_controls",
    "measure_impact",
    "perplexity",
    "probe_tokens",
    "random_controls",
    "restore_note",
    "token_losses",
    "zeroed",
]

TENSOR = "down_proj"
"""The name the outputs give the edited tensor (``mlp.down_proj`` in Hugging Face checkpoints)."""

PADDING = "right"
"""Passages are never padded; ``right`` keeps TransformerLens from masking tokens equal to the pad id."""

Progress = Callable[[Iterable[Any], int | None, str], Iterator[Any]]


# --- where an entry lives ---------------------------------------------------------------------------------


def _stored_order(expert: int | None, row: Any, col: Any) -> tuple[Any, Any]:
    """``(row, col)`` in the order the down projection's tensor stores them.

    ``(col, row)`` in a dense layer (TransformerLens' ``W_out`` is ``(d_mlp, d_model)``), ``(row, col)``
    in an expert (``W_out.weight`` is ``(d_model, d_mlp)``, as Hugging Face stores ``down_proj``).
    Swapping is its own inverse, so this also turns a stored index or shape back into ``(row, col)``.
    """
    return (col, row) if expert is None else (row, col)


def down_proj(model: HookedTransformer, layer: int, expert: int | None = None) -> torch.nn.Parameter:
    """Layer ``layer``'s down projection as stored: ``W_out`` ``(d_mlp, d_model)``, or expert ``expert``'s
    ``W_out.weight`` ``(d_model, d_mlp)``.

    The layer must exist (params are checked with :func:`runner.hooks.require_layers`). A dense
    request on a layer without a single 2-D ``W_out`` (a mixture of experts) is a :class:`ResourceError`.
    """
    mlp: Any = model.blocks[layer].mlp
    if expert is not None:
        expert_weight: torch.nn.Parameter = mlp.experts[expert].W_out.weight
        return expert_weight
    weight = getattr(mlp, "W_out", None)
    if not isinstance(weight, torch.nn.Parameter) or weight.ndim != 2:
        raise ResourceError(
            f"Layer {layer}'s MLP ({type(mlp).__name__}) has no single down projection "
            "W_out of shape (d_mlp, d_model); mixture-of-experts MLPs are not supported by this analysis.\n"
            "Use a dense model (Llama, Qwen2, GPT-2, OLMo, ...)."
        )
    return weight


@dataclass(frozen=True)
class Region:
    """A part of layer ``layer``'s down projection (of expert ``expert``'s, in a mixture-of-experts layer)
    that :func:`zeroed` can zero: a :class:`SuperWeight` or a :class:`Neuron`."""

    layer: int
    expert: int | None = field(default=None, kw_only=True)
    """The expert of a mixture-of-experts layer; None in a dense layer."""

    def tensor(self, model: HookedTransformer) -> torch.nn.Parameter:
        """The tensor holding the region (:func:`down_proj`)."""
        return down_proj(model, self.layer, self.expert)

    def index(self) -> tuple[Any, ...]:
        """The region's index in :meth:`tensor`."""
        raise NotImplementedError


@dataclass(frozen=True, order=True)
class SuperWeight(Region):
    """One entry ``down_proj.weight[row, col]``: a super weight, a candidate or a control."""

    row: int
    """Output channel (a d_model dimension of the residual stream)."""
    col: int
    """Input channel: the neuron (a d_mlp dimension)."""

    def index(self) -> tuple[int, int]:
        """The index in :meth:`tensor`: ``(col, row)`` in a dense layer, ``(row, col)`` in an expert."""
        return _stored_order(self.expert, self.row, self.col)

    def value(self, model: HookedTransformer) -> float:
        """The entry's value, as the model holds it now."""
        return float(self.tensor(model).detach()[self.index()])

    def shape(self, model: HookedTransformer) -> tuple[int, int]:
        """``(rows, cols)`` of the down projection: ``(d_model, d_mlp)``."""
        first, second = self.tensor(model).shape
        return _stored_order(self.expert, first, second)

    def neuron(self) -> Neuron:
        """The entry's whole neuron (column ``col``)."""
        return Neuron(self.layer, self.col, expert=self.expert)

    def label(self) -> str:
        """``L11-R507-C1229``, as in the seed's file names; ``L0-E3-R7-C5`` in expert 3."""
        expert = "" if self.expert is None else f"-E{self.expert}"
        return f"L{self.layer}{expert}-R{self.row}-C{self.col}"

    def as_dict(self) -> dict[str, int]:
        """``{"layer", "row", "col"}`` (``"expert"`` after ``"layer"`` in an expert): the outputs' columns."""
        expert = {} if self.expert is None else {"expert": self.expert}
        return {"layer": self.layer, **expert, "row": self.row, "col": self.col}


@dataclass(frozen=True)
class Neuron(Region):
    """Every entry of neuron ``col``'s output, ``down_proj.weight[:, col]`` (``W_out[col]`` in a dense
    layer): zeroing it silences the neuron."""

    col: int

    def index(self) -> tuple[Any, Any]:
        """The index in :meth:`tensor`: ``(col, :)`` in a dense layer, ``(:, col)`` in an expert."""
        return _stored_order(self.expert, slice(None), self.col)

    def output(self, model: HookedTransformer) -> torch.Tensor:
        """What one unit of the neuron's activation writes into the residual stream: ``(d_model,)``."""
        return self.tensor(model)[self.index()]

    def label(self) -> str:
        """``L1-N5``."""
        return f"L{self.layer}-N{self.col}"


@contextmanager
def zeroed(model: HookedTransformer, regions: Iterable[Region]) -> Iterator[None]:
    """Zero every region for the block, then restore the original values bit for bit.

    Regions may overlap or repeat: values are saved before anything is zeroed and restored in reverse
    order, so the weights end exactly as they began, even on an exception.
    """
    places = [(region.tensor(model), region.index()) for region in regions]
    saved = [(tensor, index, tensor.detach()[index].clone()) for tensor, index in places]
    try:
        with torch.no_grad():
            for tensor, index, _ in saved:
                tensor[index] = 0
        yield
    finally:
        with torch.no_grad():
            for tensor, index, original in reversed(saved):
                tensor[index] = original


# --- controls ---------------------------------------------------------------------------------------------


def _distinct(
    weights: Sequence[SuperWeight], candidates: Callable[[SuperWeight], Iterator[SuperWeight]]
) -> list[SuperWeight]:
    """For each weight, the first of ``candidates(weight)`` neither in ``weights`` nor picked before."""
    taken = set(weights)
    picked = []
    for weight in weights:
        choice = next(c for c in candidates(weight) if c not in taken)
        taken.add(choice)
        picked.append(choice)
    return picked


def random_controls(
    model: HookedTransformer, weights: Sequence[SuperWeight], rng: np.random.Generator
) -> list[SuperWeight]:
    """One uniformly random entry of each weight's tensor (same layer and expert), never one of
    ``weights``, all distinct. Draws the row, then the column, until one fits."""

    def draws(weight: SuperWeight) -> Iterator[SuperWeight]:
        rows, cols = weight.shape(model)
        while True:
            yield replace(weight, row=int(rng.integers(rows)), col=int(rng.integers(cols)))

    return _distinct(weights, draws)


def magnitude_controls(model: HookedTransformer, weights: Sequence[SuperWeight]) -> list[SuperWeight]:
    """For each weight, the largest-|w| entry of its tensor that is neither one of ``weights`` nor taken
    (ties: the first in the tensor's storage order)."""

    def by_magnitude(weight: SuperWeight) -> Iterator[SuperWeight]:
        stored = weight.tensor(model).detach()  # (d_mlp, d_model) dense, (d_model, d_mlp) expert
        order = torch.argsort(stored.abs().flatten(), descending=True, stable=True)
        for flat in order.tolist():
            row, col = _stored_order(weight.expert, *divmod(flat, stored.shape[1]))
            yield replace(weight, row=row, col=col)

    return _distinct(weights, by_magnitude)


# --- perplexity -------------------------------------------------------------------------------------------


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


class Restored(NamedTuple):
    """Perplexity after every edit was undone, and whether it and the tensors are bit for bit as before."""

    perplexity: float
    exact: bool
    """The losses equal the baseline's (the same computation on the same weights)."""
    weights_exact: bool
    """Every tensor zeroed meanwhile equals its copy taken before the first edit."""


class Perplexities:
    """Perplexity of one model on fixed passages, as loaded and with chosen regions zeroed.

    The baseline is measured on creation; :meth:`zeroed` restores after each measurement, and
    :meth:`restored` measures once more and checks that nothing changed.
    """

    def __init__(
        self,
        model: HookedTransformer,
        tokens: torch.Tensor,
        *,
        batch_size: int,
        progress: Progress | None = None,
        needed_by: str,
    ) -> None:
        """``tokens`` is ``(n, max_len)``; ``needed_by`` opens the error message (``super_weights case x:
        perplexity``) when passages are too short to predict a token."""
        if tokens.shape[1] < 2:
            raise ResourceError(
                f"{needed_by} needs passages of at least 2 tokens, but dataset.max_len is "
                f"{tokens.shape[1]}. Raise `dataset.max_len`."
            )
        self.model, self.tokens, self.batch_size, self.progress = model, tokens, batch_size, progress
        self._originals: dict[int, tuple[torch.nn.Parameter, torch.Tensor]] = {}
        self._baseline = self._losses("baseline")
        self.baseline = perplexity(self._baseline)
        self.n_tokens = int(self._baseline.numel())
        """Tokens scored."""

    @classmethod
    def of_case(cls, ctx: StepContext, *, batch_size: int, needed_by: str) -> Perplexities:
        """The case's model on the case's dataset, advancing the run's progress bar."""
        model, tokens = ctx.model.model, ctx.dataset.tokens
        return cls(model, tokens, batch_size=batch_size, progress=ctx.progress, needed_by=needed_by)

    def zeroed(self, label: str, regions: Sequence[Region]) -> float:
        """Perplexity with ``regions`` zeroed; they are restored before this returns."""
        for region in regions:
            tensor = region.tensor(self.model)
            self._originals.setdefault(id(tensor), (tensor, tensor.detach().clone()))
        with zeroed(self.model, regions):
            return perplexity(self._losses(label))

    def restored(self) -> Restored:
        """Measure again after every edit: equal to the baseline on a deterministic device."""
        losses = self._losses("restored")
        same = all(torch.equal(tensor.detach(), copy) for tensor, copy in self._originals.values())
        return Restored(perplexity(losses), bool(torch.equal(losses, self._baseline)), same)

    def _losses(self, label: str) -> torch.Tensor:
        return token_losses(
            self.model,
            self.tokens,
            batch_size=self.batch_size,
            progress=self.progress,
            description=f"perplexity: {label}",
        )


@dataclass
class ControlImpact:
    """One set of controls, matched one to one with the weights, and perplexity with them zeroed."""

    weights: list[SuperWeight]
    values: list[float]
    """Each control's value as loaded."""
    each: list[float] = field(default_factory=list)
    """Perplexity with each control zeroed alone (empty unless asked for)."""
    together: float | None = None
    """Perplexity with the controls of the weights zeroed together zeroed at once (None when none)."""


@dataclass
class Impact:
    """Perplexities of the paper's conditions (:func:`measure_impact`)."""

    baseline: float
    n_tokens: int
    single: list[float] = field(default_factory=list)
    """Perplexity with each weight zeroed alone, in the order given."""
    all_zeroed: float | None = None
    """With the chosen weights zeroed together (None when none was chosen)."""
    controls: dict[str, ControlImpact] = field(default_factory=dict)
    restored: float | None = None
    """After every edit (None when nothing was zeroed)."""
    restored_exact: bool | None = None
    weights_restored_exact: bool | None = None

    def ratio(self, value: float | None) -> float | None:
        """``value`` over the baseline (None stays None)."""
        return None if value is None else value / self.baseline

    def max_ratio(self, values: Iterable[float]) -> float | None:
        """The largest of ``values`` over the baseline (None when empty)."""
        return max((value / self.baseline for value in values), default=None)


def measure_impact(
    bench: Perplexities,
    weights: Sequence[SuperWeight],
    controls: Mapping[str, Sequence[SuperWeight]],
    *,
    together: Sequence[int] | None = None,
    control_each: bool = False,
) -> Impact:
    """Perplexity with each weight zeroed alone, with the weights ``together`` (indices; default all)
    zeroed at once, the same for each named set of matched controls (each alone with ``control_each``),
    and restored. Without weights nothing is zeroed, so nothing is restored either."""
    impact = Impact(bench.baseline, bench.n_tokens)
    for name, picked in controls.items():
        impact.controls[name] = ControlImpact(list(picked), [c.value(bench.model) for c in picked])
    if not weights:
        return impact
    chosen = range(len(weights)) if together is None else together
    impact.single = [bench.zeroed(f"{w.label()} zeroed", [w]) for w in weights]
    impact.all_zeroed = bench.zeroed("all zeroed", [weights[i] for i in chosen]) if chosen else None
    for name, control in impact.controls.items():
        _zero_controls(bench, name, control, chosen, each=control_each)
    impact.restored, impact.restored_exact, impact.weights_restored_exact = bench.restored()
    return impact


def _zero_controls(
    bench: Perplexities, name: str, control: ControlImpact, chosen: Sequence[int], *, each: bool
) -> None:
    """Perplexity with each control zeroed alone (with ``each``), and with those at ``chosen`` at once."""
    if each:
        control.each = [bench.zeroed(f"{name} control {c.label()}", [c]) for c in control.weights]
    group = [control.weights[i] for i in chosen]
    control.together = bench.zeroed(f"{name} controls", group) if group else None


def restore_note(impact: Impact | None, analysis: str) -> str | None:
    """A note when perplexity after restoring differs from the baseline (a non-deterministic device);
    a ``RuntimeError`` when a zeroed tensor did not get its bits back (a bug); else (or without an
    impact) None."""
    if impact is None:
        return None
    if impact.weights_restored_exact is False:
        raise RuntimeError(f"{analysis}: the edited tensors differ from the originals after restoring")
    if impact.restored_exact is False:
        return (
            f"Perplexity after restoring the weights ({impact.restored!r}) differs from the baseline "
            f"({impact.baseline!r}) although the weights are restored exactly: the device computes "
            "non-deterministically."
        )
    return None


# --- detection --------------------------------------------------------------------------------------------


def probe_tokens(model: HookedTransformer, text: str, prepend_bos: bool | None) -> torch.Tensor:
    """``text`` as ``(1, pos)`` tokens on the model's device; BOS as the tokenizer adds it when None."""
    prepend = model.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
    tokens = model.to_tokens(text, prepend_bos=prepend)  # (1, pos)
    return tokens.to(next(model.parameters()).device)


def largest_entry(values: torch.Tensor) -> tuple[float, int, int]:
    """The largest-|·| entry of a 2-D tensor: ``(signed value, row, column)``, the first on ties."""
    row, col = divmod(int(values.abs().argmax()), values.shape[1])
    return float(values[row, col]), row, col


class Spike(Protocol):
    """A measurement that points at one candidate entry."""

    @property
    def weight(self) -> SuperWeight: ...


S = TypeVar("S", bound=Spike)


@dataclass(frozen=True)
class Found(Generic[S]):
    """A detected super weight: the spike that revealed it, its value as loaded, the pass that found it."""

    spike: S
    value: float
    iteration: int
    """The probe pass (0-based)."""

    @property
    def weight(self) -> SuperWeight:
        """The entry the spike points at."""
        return self.spike.weight


@dataclass
class Detection(Generic[S]):
    """Every pass's spikes, and the super weights found in them."""

    found: list[Found[S]]
    passes: list[list[S]]
    """``passes[i]``: the spikes measured in probe pass ``i``."""
    converged: bool
    """True when the last pass found nothing new (False: stopped at ``max_iterations``)."""
    probe_tokens: list[str]


def detect(
    model: HookedTransformer,
    measure: Callable[[set[SuperWeight]], list[S]],
    accept: Callable[[S], bool],
    *,
    max_iterations: int,
    probe_tokens: Sequence[str] = (),
) -> Detection[S]:
    """The paper's iterative detection: each pass zeroes every weight found so far and calls
    ``measure(found weights)``; the accepted spikes' new weights are found. Stops when a pass finds
    nothing new or after ``max_iterations`` passes; every weight ends as it began."""
    found: list[Found[S]] = []
    passes: list[list[S]] = []
    for iteration in range(max_iterations):
        known = {f.weight for f in found}
        with zeroed(model, sorted(known)):
            spikes = measure(known)
        passes.append(spikes)
        new = [s for s in spikes if accept(s) and s.weight not in known]
        if not new:
            return Detection(found, passes, True, list(probe_tokens))
        found += [Found(s, s.weight.value(model), iteration) for s in new]
    return Detection(found, passes, False, list(probe_tokens))
