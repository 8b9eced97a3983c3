"""Load a :class:`~analyses._toy_sources.CheckpointSource`: a toy model, or a decomposition with its target.

An earlier step's cases are read as typed results (``ctx.outputs``); a folder as the checkpoint files
the steps write. Every failure is a :class:`~runner.errors.ResourceError` naming the case, the field
and what to do, so the run stops with exit code 2 and no traceback.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from analyses._spd import (
    SPD_CONFIG_FILE,
    SPD_WEIGHTS_FILE,
    Decomposition,
    SpdConfig,
    load_spd_checkpoint,
    spd_from_arrays,
)
from analyses._toy_model import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    ResidMLP,
    ToyConfig,
    load_toy_checkpoint,
    toy_from_arrays,
)
from analyses._toy_sources import CheckpointSource
from analyses.decompose_spd import DecomposeSpdResult
from analyses.train_toy_model import TrainToyModelResult
from runner.errors import ResourceError
from runner.step import StepContext

__all__ = ["LoadedToy", "load_source"]


@dataclass
class LoadedToy:
    """A toy model and, when the source is a decomposition, its components and gates."""

    target: ResidMLP
    decomposition: Decomposition | None
    origin: str
    """Where it came from, for reports: ``step decompose (case decompose)`` or a folder."""


def load_source(
    ctx: StepContext, source: CheckpointSource, *, where: str, field: str = "source"
) -> LoadedToy:
    """The toy model or decomposition ``source`` names; ``where`` and ``field`` locate errors."""
    if source.from_step is not None:
        return _from_step(ctx, source.from_step, where, field)
    assert source.path is not None
    return _from_path(ctx.spec_dir / source.path, where, field)


def _from_step(ctx: StepContext, step_id: str, where: str, field: str) -> LoadedToy:
    cases = ctx.outputs(step_id)
    if len(cases) != 1:
        raise ResourceError(
            f"{where}: `{field}.from_step: {step_id}` has {len(cases)} cases "
            f"({', '.join(c.id for c in cases)}); a toy source must be one model.\n"
            "Remove the sweep from that step, or give one case's data folder "
            f"as `{field}.path`."
        )
    case = cases[0]
    result = case.result
    origin = f"step {step_id} (case {case.id})"
    if isinstance(result, DecomposeSpdResult):
        config = SpdConfig.from_json(result.spd_config)
        return LoadedToy(*_with_target(spd_from_arrays(config, result.tensors)), origin)
    if isinstance(result, TrainToyModelResult):
        model = toy_from_arrays(ToyConfig.from_json(result.toy_config), result.tensors)
        return LoadedToy(model, None, origin)
    raise ResourceError(
        f"{where}: `{field}.from_step: {step_id}` runs analysis {case.analysis!r}, "
        "which makes no toy model.\n"
        "Point it at a `train_toy_model` or `decompose_spd` step."
    )


def _from_path(folder: Path, where: str, field: str) -> LoadedToy:
    if folder.is_file():
        folder = folder.parent
    spd = folder / SPD_CONFIG_FILE, folder / SPD_WEIGHTS_FILE
    toy = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    try:
        if all(p.is_file() for p in spd):
            return LoadedToy(*_with_target(load_spd_checkpoint(folder)), str(folder))
        if all(p.is_file() for p in toy):
            return LoadedToy(load_toy_checkpoint(folder), None, str(folder))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, json.JSONDecodeError) as exc:
        raise ResourceError(
            f"{where}: `{field}.path` {folder} holds a checkpoint that cannot be read: {exc}\n"
            "Point it at a folder written by a `train_toy_model` or `decompose_spd` step."
        ) from None
    found = "does not exist" if not folder.exists() else "has no checkpoint"
    raise ResourceError(
        f"{where}: `{field}.path` {folder} {found}: expected {SPD_CONFIG_FILE} + {SPD_WEIGHTS_FILE} (a "
        f"decompose_spd case's data folder) or {CONFIG_FILE} + {WEIGHTS_FILE} (a train_toy_model one).\n"
        "Paths are relative to the spec file; or read an earlier step with `from_step`."
    )


def _with_target(decomposition: Decomposition) -> tuple[ResidMLP, Decomposition]:
    return decomposition.target, decomposition
