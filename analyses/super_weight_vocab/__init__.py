"""What super weights do to the vocabulary: direct logit effects, interventions, cascades.

For each super weight ``down_proj.weight[row, col]`` of layer ``L`` (found by an earlier
``super_weights`` step, or listed by hand) this measures:

- **The neuron's vocabulary effects** (a "neuron card"). Neuron ``col`` writes ``W_out[col]`` into
  the residual stream per unit of activation. Read through the unembedding, with the final norm's
  gain ``g`` applied (its per-token scale ignored; LayerNorm also centres the direction), that is
  one direct logit effect per token, ``effect = (W_out[col] ⊙ g) · W_U``: the tokens it promotes and
  suppresses, and the moments of the effect distribution over the vocabulary (variance, skew, excess
  kurtosis). The cosine variant divides each effect by both vectors' norms. High kurtosis with
  positive (negative) skew is what Gurnee et al. 2024 ("Universal Neurons in GPT2 Language Models")
  call a prediction (suppression) neuron; the card's ``label`` says which, if either. Enrichment
  scores token classes (digits and years, punctuation and brackets, function words, ...) by their
  standardized mean effect.
- **The weight's interventional impact** over sliding windows of the spec's dataset: the change in
  next-token loss, predictive entropy, top-k margin (probability of the most likely token minus that
  of the k-th) and stopword mass (probability on function words) when the weight is zeroed, with the
  tokens whose mean probability changes most. Controls: a random coordinate of the same tensor zeroed
  (seeded by the case seed), and the whole neuron zeroed (its row ``W_out[col]``). Bootstrap
  confidence intervals resample windows.
- **The cascade**: the same change in entropy and margin read through the logit lens
  (``ln_final`` then ``W_U`` applied to ``blocks.{l}.hook_resid_post``) at a list of layers.

Windows are cut from the dataset's token stream (its passages joined back together, BOS removed);
each window gets the BOS token back when the dataset has one, so ``window_len`` counts it, as
``dataset.max_len`` does. Every position of a window that predicts a token of the window is scored,
except the first with ``drop_first_token``; overlapping windows (``stride < window_len``) score a
token once per window that holds it.

Replaces the seed script ``run_vocab_analyses.py`` and keeps its schemas and file names
(``neurons.jsonl``, ``super_weights.jsonl``, ``neurons.csv``, ``super_weights.csv``, plots
``neurons/{layer}-{neuron}-effects.png``, ``super_weights/{tensor}-L{layer}-R{row}-C{col}-deltas.png``
and ``-cascade.png``).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from runner.params import Indices
from runner.registry import analysis
from runner.results import JSONValue, StepResult
from runner.step import StepContext, StepOutput


class SuperWeightVocabParams(BaseModel):
    """Parameters of ``super_weight_vocab`` (the seed's ``run_vocab_analyses.py`` flags)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    from_step: str = "super_weights"
    """The ``super_weights`` step whose detected weights are analysed (its cases on this case's model)."""

    weights: tuple[tuple[int, int, int], ...] | None = None
    """Analyse these ``[layer, row, col]`` instead (``down_proj.weight[row, col]``); ``from_step`` is
    then not read."""

    max_weights: int | None = Field(default=None, ge=1)
    """Analyse at most this many weights: the strongest by the detection step's perplexity ratio
    (detection order when it measured none). Default: all."""

    tokens: int = Field(default=30000, ge=2)
    """Text tokens of the dataset to slide windows over (the dataset must hold that many)."""

    window_len: int = Field(default=1024, ge=2)
    """Tokens per window, BOS included when the dataset prepends it; at most the model's context."""

    stride: int = Field(default=512, ge=1)
    """Tokens between the starts of consecutive windows; at most the window's text length."""

    drop_first_token: bool = False
    """Do not score the first position of each window (the prediction made from BOS, or from one token)."""

    batch_size: int = Field(default=1, ge=1)
    """Windows per forward pass. Each holds ``window_len × vocabulary`` probabilities in memory."""

    top_k: int = Field(default=20, ge=1)
    """Tokens listed per direction: top promoted / suppressed, and largest probability changes."""

    margin_k: int = Field(default=2, ge=2)
    """``topk_margin`` is the probability of the most likely token minus that of the k-th."""

    cosine: bool = True
    """Also compute the cosine variant of the vocabulary effects (the seed's ``--enable-cosine``)."""

    enrichment: bool = True
    """Score token classes by their mean effect (the seed's ``--enable-enrichment``)."""

    cascade: bool = True
    """Read the change in entropy and margin through the logit lens at ``cascade_layers``."""

    cascade_layers: Indices | None = None
    """Layers for the cascade. Default: eight evenly spaced layers, first and last included."""

    bootstrap: int = Field(default=200, ge=0)
    """Bootstrap resamples of the windows for 95% confidence intervals of the deltas; 0 disables."""

    label_kurtosis: float = Field(default=10.0, gt=0)
    """Excess kurtosis above which a neuron is labelled ``prediction`` (positive skew) or ``suppression``."""

    @model_validator(mode="after")
    def _check_windows(self) -> SuperWeightVocabParams:
        """What can be checked without the dataset and the model (they are checked when the case runs)."""
        problems = []
        if self.stride > self.window_len:
            problems.append(
                f"stride ({self.stride}) is larger than window_len ({self.window_len}): the tokens between "
                "windows would never be scored. Use stride <= window_len, "
                f"e.g. stride: {self.window_len // 2 or 1}."
            )
        if self.window_len > self.tokens:
            problems.append(
                f"window_len ({self.window_len}) is larger than tokens ({self.tokens}): "
                "not even one window fits. "
                f"Raise tokens to at least {self.window_len} or lower window_len."
            )
        if self.drop_first_token and self.window_len < 3:
            problems.append("drop_first_token needs window_len >= 3, or no position is left to score.")
        if problems:
            raise ValueError(" ".join(problems))
        return self


class VocabWeightEffect(BaseModel):
    """What zeroing one super weight does over the dataset's windows, against its controls."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    layer: int
    row: int
    col: int
    value: float
    deltas: dict[str, float]
    """Mean change of each metric (loss, entropy, topk_margin, stopword_mass) with the weight zeroed."""
    random_coord_delta: dict[str, float]
    """The same with a random coordinate of the tensor zeroed instead."""
    neuron_zero_delta: dict[str, float]
    """The same with the weight's whole neuron (its row of ``W_out``) zeroed."""
    loss_ci: list[float] | None
    """Bootstrap 95% interval of the loss change (None without ``bootstrap``)."""
    top_prob_up: list[str]
    """The tokens whose probability rises most."""


class NeuronCard(BaseModel):
    """A super weight's neuron read through the unembedding."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    layer: int
    neuron: int
    label: str
    """A short reading of the effect distribution's shape (e.g. heavy-tailed, suppressive)."""
    var: float
    skew: float
    kurt: float
    top_up: list[str]
    top_down: list[str]


class SuperWeightVocabResult(StepResult):
    """Vocabulary effects of each super weight: what expectations read (``weights[0].deltas.loss``)."""

    model: str
    n_weights: int
    windows: JSONValue
    """How the dataset was cut: n, window_len, stride, tokens, bos, drop_first_token, scored_positions."""
    baselines: dict[str, float] | None
    """Mean of each metric with the model as loaded."""
    weights: list[VocabWeightEffect]
    neurons: list[NeuronCard]


@analysis("super_weight_vocab", params=SuperWeightVocabParams, result=SuperWeightVocabResult)
def super_weight_vocab(ctx: StepContext, params: SuperWeightVocabParams) -> StepOutput:
    """Vocabulary effects, windowed interventions with controls, and logit-lens cascades of super weights."""
    from analyses.super_weight_vocab.compute import run

    return run(ctx, params)
