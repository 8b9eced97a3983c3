"""Registries of named things, and the ``@analysis`` decorator that fills the analysis registry.

A :class:`Registry` refuses duplicate names (naming both definitions) and answers an unknown name
with close matches and the full list, the way ``lm-evaluation-harness`` does.

Registration is cheap by design: each analysis is a package under ``analyses/`` whose
``__init__`` holds only its params model, its result model and the registered function, which
imports the heavy computing module (torch, TransformerLens, ...) when a case runs. So
``runner validate`` and ``runner plan`` import every analysis without importing torch.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from runner.errors import RunnerError
from runner.results import StepResult

__all__ = [
    "ANALYSES",
    "RESOURCES",
    "Analysis",
    "Registry",
    "analysis",
    "close_matches",
    "did_you_mean",
    "load_analyses",
]

T = TypeVar("T")

DEFAULT_RTOL = 1e-4
"""float32 carries ~7 significant digits; a sum over thousands of tokens computed in another order
(another CPU, thread count or BLAS) moves the last 2-3 of them. 1e-4 allows that and nothing more."""
DEFAULT_ATOL = 1e-6
"""Numbers below this are zero for the comparison (e.g. a mean over cancelling gradients)."""


def close_matches(name: str, candidates: list[str], n: int = 3, cutoff: float = 0.6) -> list[str]:
    """Names in ``candidates`` that look like a misspelling of ``name`` (case-insensitive, best first)."""
    by_lower = {c.lower(): c for c in candidates}
    found = difflib.get_close_matches(name.lower(), list(by_lower), n=n, cutoff=cutoff)
    return [by_lower[m] for m in found]


def did_you_mean(name: str, candidates: list[str], n: int = 3, cutoff: float = 0.6) -> str:
    """``" Did you mean 'x'?"`` or an empty string: the one way every message suggests names."""
    matches = close_matches(name, candidates, n=n, cutoff=cutoff)
    return f" Did you mean {' or '.join(repr(m) for m in matches)}?" if matches else ""


class Registry(Generic[T]):
    """A name → object mapping that explains itself when a lookup fails."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._origins: dict[str, str] = {}

    def add(self, name: str, item: T, origin: str) -> None:
        """Register ``item`` under ``name``; ``origin`` names its definition for error messages."""
        if name in self._items:
            raise RunnerError(
                f"Duplicate {self.kind} name {name!r}: defined by {self._origins[name]} and by {origin}.\n"
                "Rename one of them."
            )
        self._items[name] = item
        self._origins[name] = origin

    def get(self, name: str) -> T:
        """The item called ``name``, or a :class:`RunnerError` suggesting close names."""
        try:
            return self._items[name]
        except KeyError:
            raise RunnerError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        """``Unknown analysis 'x'. Did you mean 'y'? Available: a, b, c``."""
        available = ", ".join(sorted(self._items)) or "(none)"
        return f"Unknown {self.kind} {name!r}.{did_you_mean(name, list(self._items))} Available: {available}"

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True)
class Analysis:
    """A registered analysis: its params and result models and the function that computes it."""

    name: str
    func: Callable[..., Any]
    params_model: type[BaseModel]
    result_model: type[StepResult]
    doc: str
    needs: frozenset[str]
    version: int = 1
    """Bumped by the analysis when the same params would now give other numbers (cache keys use it)."""
    rtol: float = DEFAULT_RTOL
    """Relative tolerance when ``runner rerun`` compares a recomputed number with the recorded one."""
    atol: float = DEFAULT_ATOL
    """Absolute tolerance of the same comparison (what counts as zero)."""

    @property
    def summary(self) -> str:
        """The first line of the docstring."""
        return self.doc.strip().splitlines()[0] if self.doc.strip() else ""


ANALYSES: Registry[Analysis] = Registry("analysis")

RESOURCES = frozenset({"model", "dataset", "saes"})
"""Run-scoped resources an analysis may declare in ``needs``; ``saes`` also needs a ``sae`` param."""

F = TypeVar("F", bound=Callable[..., Any])


def analysis(
    name: str,
    *,
    params: type[BaseModel],
    result: type[StepResult],
    needs: tuple[str, ...] = ("model", "dataset"),
    version: int = 1,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
) -> Callable[[F], F]:
    """Register ``func(ctx, params) -> StepOutput`` as the analysis ``name``.

    ``result`` is the type of ``StepOutput.result``; ``needs`` the run-scoped resources it uses
    (a step that needs no model runs once, not once per swept model). Checked at decoration time
    so that a malformed analysis fails when it is imported, naming the definition: the function
    takes ``(ctx, params)`` and has a docstring, ``params`` is a frozen Pydantic model that
    forbids extra keys, and ``result`` is a :class:`StepResult`. ``version`` goes into cache keys
    (bump it when the same params give other numbers); ``rtol`` / ``atol`` are the tolerances
    ``runner rerun`` compares its numbers with.
    """

    def decorate(func: F) -> F:
        origin = f"{func.__module__}.{func.__qualname__}"
        _check_definition(name, func, params, result, needs, origin)
        doc = inspect.getdoc(func) or ""
        entry = Analysis(name, func, params, result, doc, frozenset(needs), version, rtol, atol)
        ANALYSES.add(name, entry, origin)
        return func

    return decorate


def _check_definition(
    name: str,
    func: Callable[..., Any],
    params: type[BaseModel],
    result: type[StepResult],
    needs: tuple[str, ...],
    origin: str,
) -> None:
    problems = []
    if list(inspect.signature(func).parameters) != ["ctx", "params"]:
        problems.append("its signature must be (ctx, params)")
    if not inspect.getdoc(func):
        problems.append("it needs a docstring (its first line is shown by `runner list`)")
    if not (isinstance(params, type) and issubclass(params, BaseModel)):
        problems.append("params= must be a pydantic BaseModel subclass")
    elif params.model_config.get("extra") != "forbid" or not params.model_config.get("frozen"):
        problems.append(f"{params.__name__} must set model_config = ConfigDict(extra='forbid', frozen=True)")
    if not (isinstance(result, type) and issubclass(result, StepResult)):
        problems.append("result= must be a runner.results.StepResult subclass")
    unknown = set(needs) - RESOURCES
    if unknown:
        problems.append(f"needs= has unknown resources {sorted(unknown)}; known: {sorted(RESOURCES)}")
    elif "saes" in needs and "sae" not in getattr(params, "model_fields", {}):
        problems.append("needs 'saes' but its params have no `sae` field (an SAESource)")
    if problems:
        raise RunnerError(f"Analysis {name!r} defined at {origin} is malformed: " + "; ".join(problems))


def load_analyses(package: str = "analyses") -> Registry[Analysis]:
    """Import every analysis of ``package`` (its public modules and subpackages) to register them.

    Only the light declarations are imported; each analysis imports its computing code when a
    case runs.
    """
    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__, prefix=f"{package}."):
        if not info.name.rsplit(".", 1)[-1].startswith("_"):
            importlib.import_module(info.name)
    return ANALYSES
