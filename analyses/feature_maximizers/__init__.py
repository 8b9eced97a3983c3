"""Synthetic maximizers of SAE features: token sequences found by optimisation, against the dataset's best.

Replaces the seed's ``synthetic`` mode (``sae_analysis/synth_activations.py``) and adds a search over
real tokens. Two methods, each scored the same way afterwards:

- ``embedding`` (the seed's): a relaxed token distribution per position (``softmax(z / temperature)``
  over the vocabulary, times the embedding matrix) optimised with Adam (``n_steps``,
  ``learning_rate``) to maximise the feature at the sequence's last position, then projected to
  tokens (the argmax of each position's distribution). What the relaxation reached before projection
  is reported too: the gap is how far continuous optima are from any real text.
- ``discrete``: a search over real tokens, as in EPO ("fluent dreaming", Thompson et al. 2024) and GCG
  (Zou et al. 2023): a population of sequences; each round, the gradient of the objective with respect
  to each position's one-hot token proposes the ``top_k`` most promising swaps per position, a batch of
  single swaps is scored exactly, and the best distinct sequences survive (so the best never drops).
  The objective is the feature's largest activation over the sequence's positions minus ``fluency``
  times its cross-entropy under the full model (EPO's trade-off; ``fluency: 0`` runs only up to the
  SAE's layer). ``init`` says where the population starts: ``dataset``, the ``seq_len`` tokens ending at
  each of the feature's top activations in the dataset (as EPO seeds from dataset examples);
  ``random``, tokens drawn from the dataset's; ``mixed``, restarts alternating between the two.

Every sequence starts with the model's BOS token when the dataset prepends one. Reported per feature and
method: the tokens, the activation they reach (the real tokens run through the model; the maximum over
positions after BOS), their cross-entropy under the model (mean next-token loss, nats: fluency), the
best activation in the dataset (special tokens left out), read from a ``feature_analysis`` step
(``from_step``) or computed over the dataset, and for the discrete search where it started: the init,
the starting sequence and its activation, the tokens swapped since, and the best objective per round.

Outputs: ``maximizers.jsonl`` (one line per feature and method), ``feature_N_synthetic.png`` (each
method's tokens coloured by activation, against the dataset maximum) and, with ``from_step``,
``real_vs_synthetic_comparison.png``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from runner.hooks import Site
from runner.params import Indices, parse_indices
from runner.registry import analysis
from runner.results import JSONValue, StepResult
from runner.saes import SAESource
from runner.step import StepContext, StepOutput

Method = Literal["embedding", "discrete"]
Init = Literal["dataset", "random", "mixed"]


class FeatureMaximizersParams(BaseModel):
    """Parameters of ``feature_maximizers`` (the seed's ``synthetic`` mode, plus a discrete search)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    sae: SAESource
    """Where the SAE comes from: `{name: smollm2-135m/blocks.12.hook_resid_post}` (shipped),
    `{release: ...}`, `{path: dir}` or `{from_step: train}`."""

    layer: int | None = None
    """Layer of the SAE. Default: the only layer the source covers."""

    hook: Site | None = None
    """Site at the layer. Default: the SAE's own hook."""

    features: Indices | None = None
    """Features to maximise (`0,1,2` or `0-10,50-60`); those of `features_csv` are added."""

    features_csv: str | None = None
    """A CSV with columns layer, feature, label (relative to the spec): its rows at `layer` are
    maximised, with their labels."""

    methods: list[Method] = ["embedding", "discrete"]
    """`embedding` (the seed's relaxed optimisation, then projection) and/or `discrete`."""

    from_step: str | None = None
    """A `feature_analysis` step of the same run whose per-feature maxima are the dataset's best
    (and which adds `real_vs_synthetic_comparison.png`). Default: computed over the dataset here."""

    seq_len: int = Field(default=8, ge=1, le=128)
    """Tokens optimised per sequence (after BOS)."""

    n_steps: int = Field(default=150, ge=1)
    """`embedding`: Adam steps."""

    learning_rate: float = Field(default=0.1, gt=0)
    """`embedding`: Adam's learning rate on the distribution's logits."""

    temperature: float = Field(default=1.0, gt=0)
    """`embedding`: softmax temperature of the relaxed distribution."""

    iterations: int = Field(default=40, ge=1)
    """`discrete`: rounds of gradient-proposed swaps."""

    population: int = Field(default=8, ge=1, le=256)
    """`discrete`: sequences kept each round."""

    candidates: int = Field(default=16, ge=1, le=1024)
    """`discrete`: single-token swaps scored per member each round."""

    top_k: int = Field(default=64, ge=1)
    """`discrete`: swaps proposed per position (highest gradient of the objective)."""

    fluency: float = Field(default=0.0, ge=0)
    """`discrete`: weight of the cross-entropy (nats) subtracted from the activation. 0: activation
    only, and the model runs only up to the SAE's layer while searching."""

    init: Init = "dataset"
    """`discrete`: where each restart's population starts. `dataset`: the `seq_len` tokens ending at
    the feature's top activations in the dataset (restart r takes the next `population` of them;
    positions before the passage's start, and special tokens, are filled with random dataset tokens);
    `random`: random dataset tokens; `mixed`: restarts alternate, dataset first."""

    restarts: int = Field(default=1, ge=1, le=64)
    """Independent runs from new starts (both methods); the best is kept."""

    batch_size: int = Field(default=16, ge=1)
    """Passages per forward pass when the dataset maximum is computed here."""

    @field_validator("features", mode="before")
    @classmethod
    def _read_features(cls, value: object) -> object:
        return None if value is None else parse_indices(value)

    @model_validator(mode="after")
    def _need_features(self) -> FeatureMaximizersParams:
        if self.features is None and self.features_csv is None:
            raise ValueError("name the features to maximise: `features` (e.g. `0,1,2`) or `features_csv`")
        if not self.methods:
            raise ValueError("`methods` is empty: use `embedding`, `discrete` or both")
        return self


class Maximizer(BaseModel):
    """One feature's best sequence from one method."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    feature: int
    label: str
    method: Method
    init: Literal["dataset", "random"]
    """Where the winning sequence's search started (`embedding`: always `random`)."""
    tokens: list[str]
    """The sequence, BOS included when used, as token texts."""
    token_ids: list[int]
    values: list[float]
    """The feature's activation at each token (0 at BOS)."""
    activation: float
    """The largest activation the real tokens reach (after BOS)."""
    cross_entropy: float
    """Mean next-token cross-entropy of the sequence under the full model (nats): lower is more fluent."""
    relaxed_activation: float | None
    """`embedding`: what the relaxed (continuous) input reached before projection."""
    dataset_max: float
    """The feature's largest activation over the dataset."""
    ratio: float | None
    """activation / dataset_max (None when the feature never fires on the dataset)."""
    beats_dataset: bool
    """activation >= dataset_max."""
    start_token_ids: list[int] | None
    """`discrete`: the starting sequence the winner descends from (BOS included when used)."""
    start_activation: float | None
    """`discrete`: its largest activation (after BOS), scored as `activation` is."""
    swaps: int | None
    """`discrete`: positions where the winner differs from its start."""
    trace: list[float] | None
    """`discrete`: the winning restart's best objective at the start and after each round
    (never decreasing)."""
    seconds: float


class FeatureMaximizersResult(StepResult):
    """Every feature's maximizers; ``beats`` counts, per method, features at or above the dataset's best."""

    model: str
    layer: int
    hook: str
    dataset_max_from: str
    """`step <id>` or `dataset` (computed here over `n_passages`)."""
    n_passages: int
    init: Init
    """The discrete search's `init`."""
    maximizers: list[Maximizer]
    beats: dict[str, int]
    """Method → features whose maximizer reaches at least the dataset's best activation."""
    n_features: int
    seconds: float
    timing: JSONValue
    """Seconds per stage: dataset maximum, each method, outputs."""


@analysis(
    "feature_maximizers",
    params=FeatureMaximizersParams,
    result=FeatureMaximizersResult,
    needs=("model", "dataset", "saes"),
    version=2,
)
def feature_maximizers(ctx: StepContext, params: FeatureMaximizersParams) -> StepOutput:
    """Token sequences that maximise SAE features (relaxed and discrete search) against the dataset's best."""
    from analyses.feature_maximizers.compute import run

    return run(ctx, params)
