"""Where a toy model or its SPD decomposition comes from: an earlier step of the spec, or a folder.

Light (pydantic only): params models of ``decompose_spd`` and ``magnitude_sweep`` use it, and
``runner validate`` imports them without torch. Loading is in :mod:`analyses._toy_loading`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, model_validator

__all__ = ["CheckpointSource"]


class CheckpointSource(BaseModel):
    """A trained toy model or decomposition: give exactly one of ``from_step`` or ``path``."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    from_step: str | None = None
    """The id of an earlier `train_toy_model` or `decompose_spd` step of this spec."""
    path: str | None = None
    """A checkpoint folder, relative to the spec file: a `train_toy_model` case's `data/<case>/`
    (`resid_mlp.safetensors` + `resid_mlp_config.json`) or a `decompose_spd` one (`spd_model.safetensors`
    + `spd_config.json`)."""

    @model_validator(mode="after")
    def _check_one(self) -> CheckpointSource:
        given = [n for n in ("from_step", "path") if getattr(self, n) is not None]
        if len(given) != 1:
            got = f"got {' and '.join(given)}" if given else "got neither"
            raise ValueError(f"give exactly one of `from_step` (an earlier step) or `path` (a folder); {got}")
        return self

    def describe(self) -> str:
        """``step train`` or ``path runs/x/data/train``, for reports."""
        return f"step {self.from_step}" if self.from_step is not None else f"path {self.path}"
