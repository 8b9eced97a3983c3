"""What an analysis receives (:class:`StepContext`) and returns (:class:`StepOutput`).

An analysis computes; it never writes files. It returns its data keyed by file name and the
artifact writer picks the format from the extension, so the seed scripts' file names survive.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from runner.datasets import TokenDataset
    from runner.models import LoadedModel

__all__ = ["FinishedCase", "StepContext", "StepOutput"]

T = TypeVar("T")


@dataclass
class StepOutput:
    """The result of one case of an analysis.

    Attributes:
        summary: JSON-able numbers and short lists. Expectations read it (``summary.x`` is just
            ``x`` in an expression), the report shows it, the manifest stores it.
        data: file name → content, written under ``data/<case id>/``. The extension picks the
            writer: ``.csv`` and ``.jsonl`` (DataFrame or list of dicts), ``.json`` (JSON-able),
            ``.npz`` (dict of arrays, never pickled), ``.npy`` (array), ``.safetensors`` (dict of
            torch tensors), ``.txt`` / ``.md`` (str).
        plots: file name (``.png``) → matplotlib figure, written under ``plots/<case id>/``.
        notes: things the user should know about this case (a parameter adjusted, a fallback
            taken); shown in the report and the console.
    """

    summary: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    plots: dict[str, Figure] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class FinishedCase:
    """An earlier case of this run, as a later step sees it (see :meth:`StepContext.outputs`)."""

    id: str
    step_id: str
    params: Any
    model_name: str
    output: StepOutput


class StepContext:
    """Everything a case may use: run-scoped resources, the seed, progress and notes.

    Resources are loaded lazily, once per run, and shared by every case that uses the same
    model or dataset settings (like pytest fixtures with a session scope).
    """

    def __init__(
        self,
        *,
        case_id: str,
        seed: int,
        device: str,
        resources: Callable[[str], Any],
        progress: Callable[[Iterable[Any], int | None, str], Iterator[Any]] | None = None,
        finished: Callable[[str], list[FinishedCase]] | None = None,
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

    @property
    def model(self) -> LoadedModel:
        """The case's model (loaded on first use, then shared across the run)."""
        return self.resource("model")

    @property
    def dataset(self) -> TokenDataset:
        """The case's tokenized dataset (tokenized with the case's model's tokenizer)."""
        return self.resource("dataset")

    def resource(self, kind: str) -> Any:
        """The run-scoped resource ``kind`` (``"model"`` or ``"dataset"``) for this case."""
        return self._resources(kind)

    def cached(self, key: Any, load: Callable[[], T]) -> T:
        """``load()`` once per run for ``key`` (hashable), then the same object for every case.

        For resources an analysis defines itself (e.g. SAEs): like a pytest fixture with a
        session scope. Include everything that changes the result in ``key``.
        """
        if key not in self._run_cache:
            self._run_cache[key] = load()
        return self._run_cache[key]

    def outputs(self, step_id: str) -> list[FinishedCase]:
        """The finished cases of an earlier step of this run (e.g. weights a detection step found).

        Raises a user-facing error when that step has no finished case: it must come earlier in
        ``steps`` and succeed.
        """
        from runner.errors import RunnerError

        found = self._finished(step_id)
        if not found:
            raise RunnerError(
                f"Step {step_id!r} has no finished case in this run, "
                f"but case {self.case_id} needs its results.\n"
                f"List {step_id!r} before this step in `steps`, and check that it succeeded."
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
