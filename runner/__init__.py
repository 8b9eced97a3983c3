"""runner: a pytest-style, declarative experiment runner for mechanistic interpretability."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "load_run"]


def load_run(path: Any) -> Any:
    """Read a run folder (or the newest run of a spec file): see :func:`runner.load.load_run`."""
    from runner.load import load_run as load

    return load(path)
