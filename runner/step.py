"""What an analysis receives (:class:`StepContext`) and returns (:class:`StepOutput`).

An analysis computes; it never writes files. It returns its typed result (what later steps,
expectations and the report read) and, apart from it, the files meant for people: data keyed by
file name (the writer picks the format from the extension, so the seed scripts' file names
survive) and plots.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

from runner.errors import RunnerError
from runner.results import StepResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from pydantic import BaseModel

    from runner.datasets import TokenDataset
    from runner.models import LoadedModel
    from runner.saes import SAESource
    from runner.saes.loading import LoadedSAE

__all__ = ["FinishedCase", "StepContext", "StepOutput"]

T = TypeVar("T")
R = TypeVar("R", bound=StepResult)


@dataclass
class StepOutput:
    """The outcome of one case of an analysis.

    Attributes:
        result: the analysis' typed result (its declared ``result=`` model). Its JSON form is the
            case's summary: expectations read it (``summary.x`` is just ``x`` in an expression),
            the report shows it, the manifest stores it, and later steps read the result itself.
        data: file name → content, written under ``data/<case id>/`` for people and other tools.
            The extension picks the writer: ``.csv`` and ``.jsonl`` (DataFrame or list of dicts),
            ``.json`` (JSON-able), ``.npz`` (dict of arrays, never pickled), ``.npy`` (array),
            ``.safetensors`` (dict of torch tensors), ``.txt`` / ``.md`` (str).
        plots: file name (``.png``) → matplotlib figure, written under ``plots/<case id>/``.
        notes: things the user should know about this case (a parameter adjusted, a fallback
            taken); shown in the report and the console.
    """

    result: StepResult
    data: dict[str, Any] = field(default_factory=dict)
    plots: dict[str, Figure] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def summary(self) -> dict[str, Any]:
        """The result's JSON form (arrays shown by shape): what expectations read."""
        return self.result.summary()


@dataclass(frozen=True)
class FinishedCase(Generic[R]):
    """An earlier case of this run, as a later step sees it (see :meth:`StepContext.outputs`)."""

    id: str
    step_id: str
    analysis: str
    params: BaseModel
    model_name: str
    result: R
    """The typed result, as reloaded from the run folder (what a cache would give back too)."""


class StepContext:
    """Everything a case may use: run-scoped resources, the seed, progress and notes.

    Resources are loaded lazily, once per run, and shared by every case that uses the same
    model, dataset or SAE settings (like pytest fixtures with a session scope).
    """

    def __init__(
        self,
        *,
        case_id: str,
        seed: int,
        device: str,
        resources: Callable[[str], Any],
        progress: Callable[[Iterable[Any], int | None, str], Iterator[Any]] | None = None,
        finished: Callable[[str], list[FinishedCase[Any]]] | None = None,
        run_cache: dict[Any, Any] | None = None,
        spec_dir: Path | None = None,
    ) -> None:
        self.case_id = case_id
        self.seed = seed
        self.device = device
        self._resources = resources
        self._progress = progress
        self._finished = finished or (lambda step_id: [])
        self._run_cache = run_cache if run_cache is not None else {}
        self.spec_dir = spec_dir or Path.cwd()
        """The spec file's folder: relative paths in params are resolved against it."""
        self.notes: list[str] = []

    @classmethod
    def standalone(
        cls,
        *,
        model: LoadedModel | None = None,
        dataset: TokenDataset | None = None,
        seed: int = 0,
        device: str = "cpu",
        case_id: str = "standalone",
        finished: dict[str, list[FinishedCase[Any]]] | None = None,
        spec_dir: Path | None = None,
    ) -> StepContext:
        """A context outside a run, for notebooks, tests and benchmarks: call an analysis directly.

        ``finished`` maps step ids to the cases ``outputs`` returns. SAEs load as in a run.
        """

        def resource(kind: str) -> Any:
            if kind == "saes":
                from runner.saes.loading import load_saes

                return load_saes
            found = {"model": model, "dataset": dataset}.get(kind)
            if found is None:
                raise RunnerError(f"This standalone context was given no {kind}: pass {kind}= to it.")
            return found

        steps = finished or {}
        return cls(
            case_id=case_id,
            seed=seed,
            device=device,
            resources=resource,
            finished=lambda step_id: list(steps.get(step_id, [])),
            spec_dir=spec_dir,
        )

    @property
    def model(self) -> LoadedModel:
        """The case's model (loaded on first use, then shared across the run)."""
        return self.resource("model")

    @property
    def dataset(self) -> TokenDataset:
        """The case's tokenized dataset (tokenized with the case's model's tokenizer)."""
        return self.resource("dataset")

    def resource(self, kind: str) -> Any:
        """The run-scoped resource ``kind`` (``"model"``, ``"dataset"`` or ``"saes"``) for this case."""
        return self._resources(kind)

    def saes(
        self, source: SAESource, *, layers: tuple[int, ...] | None, site: str | None, where: str
    ) -> list[LoadedSAE]:
        """One SAE per requested layer from ``source`` (see :func:`runner.saes.loading.load_saes`).

        The analysis must declare ``needs=(..., "saes")``. Each SAE is loaded once per run;
        ``layers=None`` takes every layer the source has and ``site=None`` the SAE's own hook.
        ``where`` names the requester in error messages.
        """
        load = self.resource("saes")
        return list(load(self, source, layers=layers, site=site, where=where))

    def cached(self, key: Any, load: Callable[[], T]) -> T:
        """``load()`` once per run for ``key`` (hashable), then the same object for every case.

        For resources an analysis defines itself: like a pytest fixture with a session scope.
        Include everything that changes the result in ``key``.
        """
        if key not in self._run_cache:
            self._run_cache[key] = load()
        return self._run_cache[key]

    @overload
    def outputs(self, step_id: str) -> list[FinishedCase[Any]]: ...
    @overload
    def outputs(self, step_id: str, result_type: type[R]) -> list[FinishedCase[R]]: ...
    def outputs(self, step_id: str, result_type: type[R] | None = None) -> list[FinishedCase[Any]]:
        """The finished cases of an earlier step of this run, with their typed results.

        With ``result_type``, every case's result must be of that type (the step must run the
        analysis that makes it). Raises a user-facing error when the step has no finished case:
        it must come earlier in ``steps`` and succeed.
        """
        found = self._finished(step_id)
        if not found:
            raise RunnerError(
                f"Step {step_id!r} has no finished case in this run, "
                f"but case {self.case_id} needs its results.\n"
                f"List {step_id!r} before this step in `steps`, and check that it succeeded."
            )
        if result_type is not None:
            wrong = next((c for c in found if not isinstance(c.result, result_type)), None)
            if wrong is not None:
                raise RunnerError(
                    f"Case {self.case_id} reads step {step_id!r} as {result_type.__name__}, but that "
                    f"step runs analysis {wrong.analysis!r}, whose result is "
                    f"{type(wrong.result).__name__}.\nPoint it at a step of the analysis that makes "
                    f"{result_type.__name__}."
                )
        return found

    def progress(
        self, items: Iterable[T], total: int | None = None, description: str = "batches"
    ) -> Iterator[T]:
        """Iterate ``items`` while advancing the run's inner progress bar."""
        if self._progress is None:
            yield from items
        else:
            yield from self._progress(items, total, description)

    def note(self, message: str) -> None:
        """Record something the user should know about this case (shown in console and report)."""
        self.notes.append(message)
