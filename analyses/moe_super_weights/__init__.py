"""Super weights of mixture-of-experts models: per-expert detection with routing awareness.

The dense recipe of Yu et al. 2024 ("The Super Weight in Large Language Models", arXiv:2411.07918;
see :mod:`analyses.super_weights`) looks for a layer whose down projection has both a huge input
(neuron ``col``) and a huge output (channel ``row``) on a probe text. In a mixture-of-experts MLP
each expert has its own down projection and sees only the tokens the router sends it, so this
analysis runs the recipe per expert, at its routed tokens, and adds the seed's three MoE checks
(``--router-analysis-samples``, ``--p-active-floor``, ``--co-spike-threshold``) and its optional
causal scoring (``--enable-causal-scoring``). The seed has no code for them; the definitions are:

Router statistics (``router_analysis_samples``). Over every token of the first
``router_analysis_samples`` passages of the spec's dataset, per layer and expert: ``p_active``, the
fraction of tokens whose top-k selection includes the expert (it sums to ``experts_per_token`` over
a layer's experts); ``top1_fraction``, the fraction whose first choice it is; ``mean_prob``, the mean
router probability (``hook_expert_weights``: the softmax over all experts for Mixtral and OLMoE).

Rare experts (``p_active_floor``). An expert with ``p_active`` below the floor is rarely used on
real text: a spike there says little about the model, so its candidates are reported with status
``rare_expert`` and never count as super weights. The expert is still measured.

Spikes. For each expert with routed tokens: the largest ``|input|`` of its down projection
(``blocks.{L}.mlp.experts.{e}.hook_post``, d_mlp channels) and the largest ``|output|`` of that
projection itself (``W_out(hook_post)``, d_model channels, before the routing weight scales it),
over the tokens routed to the expert in the probe text (and in the first ``search_passages``
passages, if set). Both above ``spike_threshold`` make the candidate ``(layer, expert, row = output
channel, col = input channel)``, weight ``experts[e].W_out.weight[row, col]``.

Co-spike (``co_spike_threshold``). The share of the output spike that flows through the candidate
weight, at the output spike's token ``t``: ``co_spike = x[t, col] * W[row, col] / y[t, row]``
(``x`` the expert's down-projection input, ``y`` its output). It is 1 when that single weight writes
the whole spike, small when the largest input and the largest output merely co-occur in one expert
(the argmax pairing of the dense recipe is weaker in experts, which see few tokens), and negative
when the weight works against the spike. Candidates below the threshold get status
``low_co_spike``. A per-token co-occurrence rate was not used: super activations happen at a handful
of tokens (often the first), so any fraction of an expert's routed tokens would shrink with the
text's length and reject the real ones.

Accepted candidates (status ``super_weight``) are zeroed and the probe is run again, until a pass
accepts nothing new or ``max_iterations`` passes have run; every weight is restored bit for bit.

Causal scoring (``causal_scoring``). Perplexity on the spec's dataset with the model as loaded, with
each candidate (accepted or not, strongest first, up to ``max_scored``) zeroed alone, with a matched
control zeroed alone (a random entry of the same expert's down projection, seeded by the case
seed), with all accepted weights zeroed, with all their controls zeroed, and after restoring (it
must equal the baseline exactly).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from analyses.super_weights import PROBE_TEXT
from runner.params import Indices
from runner.registry import analysis
from runner.results import JSONValue, StepResult
from runner.step import StepContext, StepOutput


class MoESuperWeightsParams(BaseModel):
    """Parameters of ``moe_super_weights`` (the seed's flags, MoE ones included; its
    ``--perplexity-samples`` is the spec's ``dataset.max_passages``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    spike_threshold: float = Field(default=50.0, gt=0)
    """An expert yields a candidate when both its largest |down-projection input| and its largest
    |down-projection output| at its routed tokens exceed this value (the seed's 50)."""

    max_iterations: int = Field(default=10, ge=1)
    """Most probe passes: each zeroes every super weight found so far and looks again. Detection stops
    earlier when a pass accepts nothing new."""

    router_analysis_samples: int = Field(default=10, ge=1)
    """Passages of the spec's dataset (the first ones) whose every token is routed to measure each
    expert's ``p_active`` (the seed's ``--router-analysis-samples``)."""

    p_active_floor: float = Field(default=0.01, ge=0, le=1)
    """Experts selected for fewer than this fraction of the router-analysis tokens are rare: their
    candidates get status ``rare_expert`` and are not super weights (the seed's ``--p-active-floor``)."""

    co_spike_threshold: float = Field(default=0.12, ge=0)
    """Least share of the output spike the candidate weight must write itself,
    ``x[t, col] * W[row, col] / y[t, row]`` at the output spike's token; below it the candidate gets
    status ``low_co_spike`` (the seed's ``--co-spike-threshold``)."""

    causal_scoring: bool = False
    """Measure perplexity on the spec's dataset with each candidate zeroed alone, with a random entry of
    the same expert zeroed alone, with all super weights zeroed, with all their controls zeroed, and
    restored (the seed's ``--enable-causal-scoring``)."""

    max_scored: int = Field(default=20, ge=1)
    """Most candidates causal scoring zeroes one by one (super weights first, then the others by their
    weaker spike); each costs two perplexity passes."""

    probe_text: str = Field(default=PROBE_TEXT, min_length=1)
    """The text whose activations are inspected (the paper's sentence by default)."""

    prepend_bos: bool | None = None
    """Start the probe with BOS. Default: as the model's tokenizer does (``cfg.default_prepend_bos``)."""

    search_passages: int = Field(default=0, ge=0)
    """Also search the first this-many passages of the spec's dataset for spikes. The probe's few
    tokens reach only a few experts of each layer; passages reach the others too."""

    layers: Indices | None = None
    """MoE layers to search, e.g. ``"0-15"``. Default: every mixture-of-experts layer."""

    batch_size: int = Field(default=8, ge=1)
    """Passages per forward pass (router statistics, searched passages, perplexity). Results do not
    depend on it."""

    top_candidates: int = Field(default=5, ge=1)
    """How many experts with the strongest spikes of the first pass the summary lists as
    ``top_candidates`` (useful when nothing is accepted)."""


class ExpertWeightRecord(BaseModel):
    """One accepted super weight of an expert: ``experts[expert].down_proj.weight[row, col]`` of ``layer``."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    layer: int
    expert: int
    row: int
    """Output channel (d_model)."""
    col: int
    """Input channel: the expert's neuron (d_mlp)."""
    value: float
    iteration: int
    input_value: float
    output_value: float
    co_spike: float
    """The weight's share of the output spike."""
    p_active: float
    """How often the router sends a token to this expert."""
    n_routed: int
    input_token: JSONValue = None
    ppl: float | None = None
    ppl_ratio: float | None = None
    control_ppl_ratio: float | None = None


class MoESuperWeightsResult(StepResult):
    """Per-expert super weights, router statistics and (optionally) causal scores."""

    model: str
    moe_layers: list[int]
    num_experts: int
    experts_per_token: int
    n_found: int
    weights: list[ExpertWeightRecord]
    strongest: ExpertWeightRecord | None
    n_candidates: int
    rejected: dict[str, int]
    """Candidates rejected, by reason (``rare_expert``, ``low_co_spike``)."""
    router: JSONValue
    """``p_active``, ``top1_fraction`` and ``mean_prob`` per layer and expert."""
    causal: JSONValue
    """Perplexity with each candidate and its control zeroed, all zeroed, restored (or None)."""
    converged: bool
    iterations: int
    spike_threshold: float
    p_active_floor: float
    co_spike_threshold: float
    probe_tokens: JSONValue
    top_candidates: JSONValue


@analysis("moe_super_weights", params=MoESuperWeightsParams, result=MoESuperWeightsResult)
def moe_super_weights(ctx: StepContext, params: MoESuperWeightsParams) -> StepOutput:
    """Detect super weights per expert of a mixture-of-experts model, with router statistics and checks."""
    from analyses.moe_super_weights.compute import run

    return run(ctx, params)
