"""One tree of user-facing errors.

Every error the CLI can print derives from :class:`RunnerError`. Its message is complete: the first
line says what failed and where (``specs/x.yaml:12:5``), the following lines give context, and the
last says what to try next. The CLI prints it without a traceback and exits with ``exit_code``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ExpressionError",
    "Location",
    "PlanError",
    "ResourceError",
    "RunnerError",
    "SpecError",
    "SpecProblem",
]

USAGE_EXIT_CODE = 2


class RunnerError(Exception):
    """Base class: an error whose message is meant for the user, printed without a traceback."""

    exit_code = USAGE_EXIT_CODE


@dataclass(frozen=True)
class Location:
    """A position in a spec file (1-based line and column, as editors show them)."""

    path: str
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        parts = [self.path]
        if self.line is not None:
            parts.append(str(self.line))
            if self.column is not None:
                parts.append(str(self.column))
        return ":".join(parts)


@dataclass(frozen=True)
class SpecProblem:
    """One problem in a spec: where it is, which field, and what is wrong."""

    location: Location
    field: str
    message: str

    def __str__(self) -> str:
        prefix = f"{self.location}: "
        return f"{prefix}{self.field}: {self.message}" if self.field else f"{prefix}{self.message}"


class SpecError(RunnerError):
    """A spec file that cannot be read or does not validate; lists every problem found."""

    def __init__(self, problems: list[SpecProblem], hint: str | None = None) -> None:
        self.problems = problems
        self.hint = hint
        lines = [str(p) for p in problems]
        if hint:
            lines.append(hint)
        super().__init__("\n".join(lines))


class PlanError(RunnerError):
    """A spec that validates but cannot be turned into a plan (e.g. a sweep over an unknown key)."""


class ResourceError(RunnerError):
    """A model, tokenizer, dataset or SAE that cannot be loaded, with what to use instead."""


class ExpressionError(RunnerError):
    """An expectation expression that does not parse or uses something outside the language."""


BAD_INPUT: tuple[type[RunnerError], ...] = (SpecError, PlanError, ResourceError, ExpressionError)
"""Errors that mean the input is wrong (exit code 2), not the code."""
