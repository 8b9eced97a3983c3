"""SAE feature analysis over real activations: every feature of an SAE in one pass over the dataset.

Replaces the seed's ``real`` mode (``sae_analysis/real_activations.py``) and computes what the
dashboards researchers browse show (SAEDashboard / sae_vis, as exported to Neuronpedia): per feature,
its density (``frac_nonzero``: the fraction of counted positions where it fires; special tokens
are not counted), the mean, standard deviation, maximum and quantiles of its non-zero activations,
a 50-bin histogram of them, its top activations with a window of tokens around each
(``buffer: [5, 5]``, every token's activation), samples from 10 equal-width activation intervals
(labelled with the share of activations each holds), its decoder norm, and its decoder direction
read through the unembedding (``W_dec[f] @ W_U``: the tokens it promotes and suppresses most, and a
histogram over the vocabulary).

The model runs once per batch of passages, only up to the SAE's layer; the SAE encodes once; and
streaming accumulators (``analyses/_features.py``) keep every feature's statistics at the same time.
No loop over features, nothing written to disk until the end. SAEDashboard instead runs the model
again for every batch of 128 features.

Outputs: ``features.jsonl`` (one feature per line in Neuronpedia's feature schema), ``features.csv``
(one row per feature: density, max, mean, top tokens; its ``layer,feature,label`` columns make it a
``features_csv`` for ``sae_interventions``), the seed's ``feature_N_real.png`` for each feature with
a card, ``summary_N_real.png`` (N: the number of card features) and ``statistics_real.png``; in the
HTML report, a card per chosen feature: tokens highlighted by activation (the value on hover), the
histogram and the logit lists.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from runner.hooks import Site
from runner.params import Indices, parse_indices
from runner.registry import analysis
from runner.results import Array, JSONValue, StepResult
from runner.saes import SAESource
from runner.step import StepContext, StepOutput

CardSelection = Literal["top_frequency", "live", "random"]


class FeatureAnalysisParams(BaseModel):
    """Parameters of ``feature_analysis`` (the seed's ``real`` mode, minus model and corpus)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    sae: SAESource
    """Where the SAEs come from: `{name: smollm2-135m/blocks.12.hook_resid_post}` (shipped),
    `{release: gpt2-small-res-jb}`, `{path: dir}` (a SAELens directory, or a dictionary_learning
    folder with ae.pt and config.json) or `{from_step: train}`."""

    layers: Indices | None = None
    """Layers to analyse. Default: every layer the SAE source covers."""

    hook: Site | None = None
    """Site at each layer. Default: the SAE's own hook (resid_post of L is resid_pre of L+1)."""

    features: Literal["all"] | Indices = "all"
    """Features analysed: `all` (every feature, in one pass) or the seed's `0,1,2` / `0-10,50-60`."""

    features_csv: str | None = None
    """A CSV with columns layer, feature, label (relative to the spec): these features get cards, with
    their labels, and are analysed whatever `features` says."""

    cards: int = Field(default=8, ge=0)
    """Features with a card in the report and a `feature_N_real.png`: the listed features first (an
    explicit `features` list, then the CSV's), then by `card_selection`."""

    card_selection: CardSelection = "top_frequency"
    """How further card features are picked: `top_frequency` (densest first: the density summary),
    `live` (random among those whose mean activation is at or above `live_percentile`) or `random`
    (random among those that fire)."""

    live_percentile: float = Field(default=90.0, ge=0.0, lt=100.0)
    """`live` features have a mean activation at or above this percentile of the features that fire."""

    max_examples: int = Field(default=20, ge=1, le=1000)
    """Top activations kept per feature (the seed's `--max-examples`)."""

    buffer: tuple[int, int] = (5, 5)
    """Tokens shown before and after each example (SAEDashboard's buffer)."""

    interval_samples: int = Field(default=5, ge=0, le=50)
    """Random examples per activation interval (10 equal-width intervals); 0 keeps none."""

    top_logits: int = Field(default=10, ge=1, le=100)
    """Tokens listed as most promoted and most suppressed by each feature's decoder direction."""

    correlated: int = Field(default=5, ge=0, le=100)
    """Most correlated features listed for each feature of an explicit `features` list or of
    `features_csv` (Pearson correlation of activations over the counted positions, against every
    analysed feature, summed per batch in float64); 0 skips it. Features chosen for a card after
    the pass (`card_selection`) get none: their correlations would need a second pass."""

    batch_size: int = Field(default=16, ge=1)
    """Passages per forward pass (the seed's `--batch-size`)."""

    exclude_special_tokens: bool = True
    """Leave positions holding special tokens (BOS, EOS, padding) out of every statistic, as
    SAEDashboard does: their residual streams are outliers SAEs are not trained on."""

    @field_validator("features", mode="before")
    @classmethod
    def _read_features(cls, value: object) -> object:
        return value if value == "all" else parse_indices(value)

    @field_validator("buffer")
    @classmethod
    def _check_buffer(cls, value: tuple[int, int]) -> tuple[int, int]:
        if min(value) < 0 or max(value) > 64:
            raise ValueError(f"buffer takes two token counts between 0 and 64, got {list(value)}")
        return value


class FeatureCard(BaseModel):
    """One feature as the report's card shows it."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    layer: int
    feature: int
    label: str
    why: str
    """Why it has a card: `listed`, `csv`, `top_frequency`, `live` or `random`."""
    density: float
    max: float
    mean: float
    """Mean of the non-zero activations."""
    quantiles: list[float]
    """10%, 50%, 90% and 99% quantiles of the non-zero activations."""
    decoder_norm: float
    examples: list[JSONValue]
    """Top examples: {tokens, values, index} (index: the example's token in the window)."""
    intervals: list[JSONValue]
    """Interval samples: {bin_min, bin_max, bin_contains, examples}."""
    histogram: JSONValue
    """{heights, edges} of the non-zero activations."""
    promoted: list[JSONValue]
    """[{token, value}] most promoted by the decoder direction."""
    suppressed: list[JSONValue]
    correlated: list[JSONValue] = []
    """[{feature, pearson}] the most correlated features (only for listed and CSV features)."""


class LayerFeatures(BaseModel):
    """One SAE's features over the dataset."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    hook: str
    sae_hook: str
    sae: JSONValue
    """Where the SAE came from and its shape."""
    d_sae: int
    n_features: int
    """Features analysed."""
    n_alive: int
    """Analysed features that fire at least once."""
    n_dead: int
    mean_l0: float
    """Mean number of analysed features firing per counted position."""
    density_quantiles: list[float]
    """10%, 50%, 90% and 99% quantiles of the analysed features' densities."""
    densest: list[JSONValue]
    """The densest features: {feature, density, max, top tokens}."""
    feature_ids: Array
    """``(F,)`` the analysed features."""
    density: Array
    """``(F,)`` frac_nonzero per analysed feature."""
    max_activation: Array
    """``(F,)`` largest activation per analysed feature (0 if dead)."""
    mean_activation: Array
    """``(F,)`` mean non-zero activation per analysed feature."""
    top_values: Array
    """``(F, max_examples)`` each analysed feature's top activations, largest first (0 past the last
    non-zero one)."""
    top_tokens: Array
    """``(F, max_examples)`` where they are in the dataset: ``passage * max_len + position`` (-1 past the
    last non-zero one); ``feature_maximizers`` starts its searches from the windows ending there."""


class FeatureAnalysisResult(StepResult):
    """Per-feature statistics of each SAE over the dataset; whole tables are the data files."""

    model: str
    dataset: str
    """The dataset's fingerprint (``top_tokens`` index its passages)."""
    n_passages: int
    n_tokens: int
    """Positions counted (special tokens left out when `exclude_special_tokens`)."""
    layers: dict[int, LayerFeatures]
    cards: list[FeatureCard]
    seconds: float
    timing: JSONValue
    """Seconds per stage: forward (to the hook), encode, accumulate, logit effects, outputs."""


@analysis(
    "feature_analysis",
    params=FeatureAnalysisParams,
    result=FeatureAnalysisResult,
    needs=("model", "dataset", "saes"),
    version=3,
)
def feature_analysis(ctx: StepContext, params: FeatureAnalysisParams) -> StepOutput:
    """Every SAE feature over real text in one pass: density, histograms, top contexts, logit effects."""
    from analyses.feature_analysis.compute import run

    return run(ctx, params)
