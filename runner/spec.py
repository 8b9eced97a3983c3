"""Pydantic models of an experiment spec. YAML keys are exactly these fields.

A step's ``params`` are checked in a second stage against the params model of its registered
analysis (see :mod:`runner.planner`), so this module knows nothing about particular analyses.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ByteSize, ConfigDict, Field, model_validator

__all__ = [
    "DatasetSpec",
    "ExpectationSpec",
    "ExperimentSpec",
    "ModelSpec",
    "OutputSpec",
    "ResourcesSpec",
    "StepSpec",
    "SweepSpec",
]

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"


class StrictModel(BaseModel):
    """Frozen, and unknown keys are errors (so a misspelt key never silently does nothing)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class ModelSpec(StrictModel):
    """Which model to load, where, and in which precision."""

    name: str = "smollm2-135m"
    """`smollm2-135m` (embedded, offline), a TransformerLens name (`gpt2-small`), a Hugging Face id,
    a local checkpoint directory, or a local `.gguf` file."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto` picks CUDA when available, else the CPU."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Weights and activations dtype. float32 is exact on the CPU; half precision is for GPUs."""


class DatasetSpec(StrictModel):
    """Text to run the model on, cut into equal-length token passages (no padding)."""

    name: str = "python-docs"
    """`python-docs` (embedded: Python's pydoc topics), a `.txt`/`.jsonl` path relative to the spec,
    `wikitext-2`, or a Hugging Face dataset `path[:config]` (online)."""
    split: str = "test"
    """Split of a Hugging Face dataset."""
    text_field: str = "text"
    """Key holding the text in JSONL lines and Hugging Face rows."""
    max_passages: int = Field(64, ge=1)
    """Number of passages (the seeds call it `num_samples` / `max_passages`)."""
    max_len: int = Field(128, ge=2)
    """Tokens per passage, BOS included (the seeds' `max_length` / `max_len`)."""
    prepend_bos: bool = True
    """Start every passage with the tokenizer's BOS token."""


class SweepSpec(StrictModel):
    """Expand into cases: every combination of `product` lists, times the `zip` lists taken in step."""

    product: dict[str, list[Any]] = Field(default_factory=dict)
    """Each key takes each of its values; keys combine as a cartesian product."""
    zip: dict[str, list[Any]] = Field(default_factory=dict)
    """Lists of equal length, taken together: the i-th case uses the i-th value of each."""

    @model_validator(mode="after")
    def _check_shape(self) -> SweepSpec:
        if not self.product and not self.zip:
            raise ValueError("a sweep needs at least one key under `product` or `zip`")
        for group in (self.product, self.zip):
            for key, values in group.items():
                if not values:
                    raise ValueError(f"sweep key {key!r} has an empty list of values")
        lengths = {key: len(values) for key, values in self.zip.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"`zip` lists must have equal lengths, got {lengths}")
        both = set(self.product) & set(self.zip)
        if both:
            raise ValueError(f"keys {sorted(both)} appear in both `product` and `zip`")
        return self


class ToleranceSpec(StrictModel):
    """How close a rerun's numbers must be to the recorded ones: ``|new - old| <= atol + rtol * |old|``."""

    rtol: float | None = Field(default=None, ge=0)
    """Relative tolerance; default: the analysis' own (``runner show NAME``)."""
    atol: float | None = Field(default=None, ge=0)
    """Absolute tolerance; default: the analysis' own."""


class ResourcesSpec(StrictModel):
    """What one case of a step needs on a Ray worker (``--executor ray``); the local executor ignores it."""

    num_cpus: float | None = Field(default=None, ge=0)
    """CPU cores per case (fractions allowed); default 1."""
    num_gpus: float | None = Field(default=None, ge=0)
    """GPUs per case (fractions allowed: `0.5` puts two cases on a GPU); default 1 when the cluster has
    GPUs and the model's device is not `cpu`, else 0."""
    memory: ByteSize | None = None
    """Memory Ray reserves per case: bytes or a size such as `4GB` or `512MiB`; default none reserved."""


class StepSpec(StrictModel):
    """One registered analysis with its parameters."""

    id: str = Field(pattern=NAME_PATTERN)
    """Unique within the spec; names the step's cases (`importance[...]`) and output folders."""
    analysis: str
    """A registered analysis name (`runner list` shows them)."""
    params: dict[str, Any] = Field(default_factory=dict)
    """The analysis' parameters (`runner show NAME` lists them)."""
    sweep: SweepSpec | None = None
    """Run this step once per combination of parameter values."""
    description: str = ""
    """Shown in the plan and the report."""
    tolerance: ToleranceSpec | None = None
    """For `runner rerun`: how close this step's numbers must come to the recorded ones
    (`{rtol: 1e-4, atol: 1e-6}`); `--rtol` / `--atol` override it."""
    resources: ResourcesSpec | None = None
    """For `--executor ray`: what each case of this step reserves on a worker
    (`{num_cpus: 1, num_gpus: 0.5, memory: 4GB}`)."""


class ExpectationSpec(StrictModel):
    """A check on each case of a step, written in the safe expression language."""

    step: str
    """The step id whose results are checked (every case of it)."""
    that: str
    """An expression over the step's summary, e.g. `peak.value > 2`."""
    name: str = ""
    """Optional short name shown in the summary."""


class OutputSpec(StrictModel):
    """Where and what to write."""

    dir: str = "runs"
    """Parent folder of run folders, relative to the current directory."""
    plots: bool = True
    """Write PNG plots."""
    html: bool = True
    """Write `report.html` besides `report.md`."""


class ExperimentSpec(StrictModel):
    """An experiment: model, data, steps, sweeps and expectations."""

    name: str = Field(pattern=NAME_PATTERN)
    """Names the run folder `runs/<name>/...`."""
    description: str = ""
    seed: int = 0
    """Seeds python, numpy and torch before every case."""
    model: ModelSpec = Field(default_factory=ModelSpec)
    dataset: DatasetSpec = Field(default_factory=DatasetSpec)
    steps: list[StepSpec] = Field(min_length=1)
    sweep: SweepSpec | None = None
    """Sweep the whole spec; keys are `seed`, `model.<field>` or `dataset.<field>`."""
    expectations: list[ExpectationSpec] = Field(default_factory=list)
    output: OutputSpec = Field(default_factory=OutputSpec)
