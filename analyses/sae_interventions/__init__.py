"""SAE feature interventions: scale, clamp or ablate one SAE feature; measure what the output does.

For each chosen layer's SAE and each chosen feature, the feature's activation is edited at the SAE's
hook and the change in the model's next-token predictions is measured over the dataset, per
``alpha`` (the method of the seed pipeline "GPT-2 Small SAE Interventions", on Joseph Bloom's
``gpt2-small-res-jb`` SAEs; the steering-by-feature idea of Templeton et al. 2024, "Scaling
Monosemanticity").

The edit keeps the SAE's reconstruction error. With ``f`` the feature's activation, ``d`` its decoder
direction and ``x`` the activation at the hook, the model continues from

    x' = x + (g(f) - f) * d,     g(f) = alpha * f (scale), alpha (clamp) or 0 (ablate)

rather than from the SAE's reconstruction. Everything the SAE fails to reconstruct stays in place,
so alpha = 1 reproduces the clean model exactly and every number measures the feature's edit alone.
``clamp`` sets the activation to ``alpha`` at every position (fired or not); ``scale`` and
``ablate`` change only positions where the feature fires. A leading BOS token is never edited
(``exclude_bos``): its residual stream is an outlier SAEs are not trained on.

Per (layer, feature, alpha), over the N·(T-1) positions that predict a next token: mean change of
the cross-entropy loss (intervened - clean), mean KL(clean ‖ intervened), both also restricted to
positions where the feature fires; the tokens whose logits rise and fall most on average (overall
and where the feature fires); the feature's firing fraction; the positions edited and the positions
whose top-1 prediction changed. Text snippets show the positions with the largest KL.

Two ways to compute the same numbers (``method``):

- ``loop``: the seed's way. One full forward pass per (layer, feature, alpha) and batch of passages,
  with a hook that encodes the activation and applies the edit, then log-softmax over the vocabulary.
  The intervened pass is the clean pass's computation (the same blocks on the same batch, the same
  unembedding of the same positions), so wherever the hook adds exactly 0 (alpha = 1 under
  ``scale``; passages where a scaled or ablated feature never fires) it gives the clean logits bit
  for bit and every metric exactly 0.
- ``fast`` (default): one clean pass per batch of passages keeps the activations at each SAE's hook,
  the keys and values of later layers, and what the comparisons need of the clean predictions
  (``CleanReference``: d_model-sized vectors, not logits). Then it skips exactly what
  cannot change: alpha = 1 under ``scale``, and passages where the feature never fires (their
  output is bit-for-bit the clean output, so they add exactly zero to every sum while still
  counting in every mean). The other interventions run only the layers after the hook
  (``start_at_layer``) and only the positions from the first edited one on: a causal model's
  earlier positions are unchanged, so their keys and values come from the clean pass (as a prefix
  of cached keys and values). Many (passage, feature, alpha) rows share one forward pass, from the
  first edited position of its rows; a row's positions before its own first edit are taken as the
  clean run (recomputed, they would differ from it by rounding only).
  The rows run through a lean forward of the same blocks (``analyses/_lean_forward.py``: MLP and
  output weights read in place, one matmul for Q, K and V, scaled-dot-product attention), checked
  against TransformerLens' forward on the model's own weights when the run starts; models it does
  not cover, and ``forward: transformer_lens``, run TransformerLens' blocks with its key-value cache.
  ``benchmarks/interventions.py`` compares the methods.

The loop computes every metric over the vocabulary from the clean and intervened logits, straight
from the definitions; the fast path uses the d_model-sized identities of ``CleanReference``. The
two share no metric code, so agreement between them checks both (to float32 rounding).

On CUDA out-of-memory the case halves ``batch_size`` and starts again (the seed does the same).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from runner.hooks import Site
from runner.params import Indices
from runner.registry import analysis
from runner.results import JSONValue, StepResult
from runner.saes import SAESource
from runner.step import StepContext, StepOutput

Mode = Literal["scale", "clamp", "ablate"]


FeatureSource = Literal["explicit", "csv", "live", "top_frequency", "random"]


class SaeInterventionsParams(BaseModel):
    """Parameters of ``sae_interventions`` (the seed's flags, minus model and dataset)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    sae: SAESource
    """Where the SAEs come from: `{name: smollm2-135m/blocks.12.hook_resid_post}` (shipped),
    `{release: gpt2-small-res-jb}`, `{path: dir}` or `{from_step: train}`."""

    layers: Indices | None = None
    """Layers to intervene at (the seed's `--layers 0-11`). Default: every layer the SAE source covers."""

    hook: Site | None = None
    """Site at each layer (the seed's `--hook resid_post`). Default: the SAE's own hook. resid_post of
    layer L is served by an SAE of blocks.{L+1}.hook_resid_pre, the same tensor."""

    feature_source: FeatureSource | None = None
    """`explicit` (`features`), `csv` (`features_csv`), `live` (random among features whose mean
    activation is at or above `live_percentile`), `top_frequency` (the most often firing) or `random`
    (among features that fire on the dataset). Default: explicit with `features`, csv with
    `features_csv`, else live."""

    features: Indices | dict[int, Indices] | None = None
    """Explicit features: one list for every layer (`"0-10,50-60"`) or per layer (`{6: [12, 40]}`)."""

    features_csv: str | None = None
    """A CSV in the seed's format (`data/neuronpedia_features.csv`: columns layer, feature, label),
    relative to the spec file."""

    features_per_layer: int = Field(default=5, ge=1)
    """Features per layer for `live`, `top_frequency` and `random` (the seed picks 5)."""

    live_percentile: float = Field(default=90.0, ge=0.0, lt=100.0)
    """`live` features have a mean activation at or above this percentile of the features that fire."""

    mode: Mode = "scale"
    """`scale`: activation times alpha where the feature fires; `clamp`: set to alpha at every position;
    `ablate`: set to 0 where it fires (alpha is ignored)."""

    alpha: float = 2.0
    """The headline alpha (the seed's `--alpha`): the summary, the per-layer plot
    `layer_vs_dloss_alpha2.png` and the report's tables use it. Added to `alpha_sweep` if missing."""

    alpha_sweep: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0)
    """Every alpha measured (the seed's `alpha_sweep`), for the alpha-response curves."""

    batch_size: int = Field(default=16, ge=1)
    """Passages per clean forward pass (the fast path packs up to two batches' worth of tokens into
    each intervention pass, four on TransformerLens' blocks). Halved automatically on CUDA
    out-of-memory."""

    method: Literal["fast", "loop"] = "fast"
    """`fast`: the exact fast path; `loop`: one full forward pass per (layer, feature, alpha), as the seed."""

    forward: Literal["lean", "transformer_lens"] = "lean"
    """Blocks the fast path's rows run through: `lean` (the same blocks with weights read in place and
    scaled-dot-product attention, checked against TransformerLens when the run starts) or
    `transformer_lens` (its own forward, with its key-value cache). Same numbers to float32
    rounding; lean is the faster (see `benchmarks/interventions.py`). Models lean does not cover run
    on TransformerLens either way, with a note."""

    exclude_bos: bool = True
    """Never edit, nor count as firing, a passage's leading BOS token."""

    top_k_tokens: int = Field(default=10, ge=1)
    """Promoted and suppressed tokens listed per (layer, feature, alpha)."""

    snippets_per_intervention: int = Field(default=3, ge=0)
    """Positions with the largest KL kept per (layer, feature, alpha) for `snippets.jsonl`."""

    snippet_context: int = Field(default=24, ge=1)
    """Tokens of context shown before a snippet's position."""

    @field_validator("alpha_sweep", mode="before")
    @classmethod
    def _read_sweep(cls, value: Any) -> Any:
        """Accept the seed's `"0,0.5,1,2,4"` form and a single number."""
        if isinstance(value, str):
            try:
                return tuple(float(part) for part in value.split(",") if part.strip())
            except ValueError:
                raise ValueError(f"cannot read {value!r} as numbers like '0,0.5,1,2,4'") from None
        return (value,) if isinstance(value, int | float) else value

    @model_validator(mode="after")
    def _check_features(self) -> SaeInterventionsParams:
        source = self.chosen_source
        if source == "explicit" and self.features is None:
            raise ValueError(
                "feature_source `explicit` needs `features` (e.g. '0-10,50-60' or {6: [12, 40]})"
            )
        if source == "csv" and self.features_csv is None:
            raise ValueError("feature_source `csv` needs `features_csv` (columns layer, feature, label)")
        if self.features is not None and source != "explicit":
            raise ValueError(f"`features` is only read with feature_source `explicit`, not `{source}`")
        if self.features_csv is not None and source != "csv":
            raise ValueError(f"`features_csv` is only read with feature_source `csv`, not `{source}`")
        if not all(math.isfinite(a) for a in (*self.alpha_sweep, self.alpha)):
            raise ValueError("alphas must be finite numbers")
        return self

    @property
    def chosen_source(self) -> FeatureSource:
        """The feature source, with the default resolved."""
        if self.feature_source is not None:
            return self.feature_source
        if self.features is not None:
            return "explicit"
        return "csv" if self.features_csv is not None else "live"

    def alphas(self) -> tuple[float, ...]:
        """The alphas measured, in the order given, the headline alpha included (just 0 for `ablate`)."""
        if self.mode == "ablate":
            return (0.0,)
        return tuple(dict.fromkeys((*self.alpha_sweep, self.alpha)))


class LayerEffect(BaseModel):
    """One layer's SAE and the mean effect of its features' interventions."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    hook: str
    """The hook edited: ``blocks.{layer}.<site>``."""
    sae_hook: str
    """The hook the SAE was trained on (``hook`` or its resid_pre/resid_post twin)."""
    sae: JSONValue
    """Where the SAE came from and its shape (source, architecture, d_in, d_sae, sha256, ...)."""
    features: list[int]
    delta_loss: float
    """Mean Δ loss (nats per predicted token) over the layer's features at the headline alpha."""
    kl: float
    """Mean KL(clean ‖ intervened) over the layer's features at the headline alpha."""
    delta_loss_by_alpha: list[float]
    kl_by_alpha: list[float]


class SaeInterventionsResult(StepResult):
    """Effects of SAE feature interventions per layer, feature and alpha (the tables are data files)."""

    model: str
    mode: Mode
    method: Literal["fast", "loop"]
    forward: Literal["lean", "transformer_lens"] | None
    """The blocks the fast path ran (None for the loop)."""
    alpha: float
    """The headline alpha."""
    alphas: list[float]
    feature_source: FeatureSource
    n_passages: int
    n_tokens: int
    """Predicted tokens per intervention."""
    clean_loss: float
    layers: dict[int, LayerEffect]
    top_effect: JSONValue
    """The (layer, feature) with the largest |Δ loss| at the headline alpha."""
    identity_max_abs: float | None
    """Largest |Δ loss| or KL at alpha = 1 in `scale` mode: 0 (alpha 1 is the clean model)."""
    rows: dict[str, int]
    """(layer, feature, alpha) rows run, skipped as identities, skipped where the feature never fires."""
    seconds: float
    features_at_alpha: JSONValue
    """The per-feature table at the headline alpha (five tokens promoted and suppressed each)."""
    examples: JSONValue
    """Snippets of largest KL at the headline alpha, at most one per (layer, feature)."""


@analysis(
    "sae_interventions",
    params=SaeInterventionsParams,
    result=SaeInterventionsResult,
    needs=("model", "dataset", "saes"),
)
def sae_interventions(ctx: StepContext, params: SaeInterventionsParams) -> StepOutput:
    """Scale, clamp or ablate SAE features; Δloss, KL and logit changes per layer, feature and alpha."""
    from analyses.sae_interventions.compute import run

    return run(ctx, params)
