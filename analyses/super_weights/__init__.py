"""Super weights: single MLP down-projection weights whose removal wrecks a language model.

After Yu et al. 2024, "The Super Weight in Large Language Models" (arXiv:2411.07918). A super weight
``down_proj.weight[row, col]`` of an early layer turns a large activation of neuron ``col`` into a
"super activation" on residual channel ``row``, which then persists through the residual stream;
zeroing that one number raises perplexity by orders of magnitude in the paper's models (Llama-7B:
layer 2, row 3968, col 7003).

Detection is the paper's data-light recipe, run on one probe text. At every layer, take the largest
``|input|`` of the down projection (``blocks.{L}.mlp.hook_post``, d_mlp channels) and the largest
``|output|`` (``blocks.{L}.hook_mlp_out``, d_model channels) over all probe positions. A layer where
both exceed ``spike_threshold`` yields the candidate ``(layer, row = output channel, col = input
channel)``. The candidates are zeroed and the probe is run again, until no new candidate appears or
``max_iterations`` probe passes have run. Every weight is restored, bit for bit, at the end.

Impact: perplexity on the spec's dataset with the model as loaded (baseline), with each super weight
zeroed alone, with all of them zeroed, and again after restoring (it must equal the baseline
exactly). Two controls, matched one to one with the super weights: a random coordinate of the same
tensor (seeded by the case seed), and the largest-magnitude ordinary weight of the same tensor.

Accuracy (optional, ``accuracy_tasks``): lm-evaluation-harness scores tasks with the model as loaded,
with every super weight zeroed, and with the random controls zeroed. It runs a transformers view of
the model (:func:`analyses._transformers_view.transformers_view`) whose down projections share storage
with the ``HookedTransformer``, so the very same edits apply. Models loaded by Hugging Face id or from
a checkpoint directory have one (any architecture TransformerLens converts), and so do
Llama-architecture models from GGUF files.

Replaces the seed script ``comprehensive_super_weight_analysis.py`` and keeps its file names
(``detection_iterations.png``, ``super_weight_distribution.png``, ``impact_comparison.png``,
``combined_analysis.png``, ``individual_analyses/sw_{i}_analysis.json``, ``combined_analysis.json``).
The run folder carries the timestamp, so file names do not.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from runner.params import Indices
from runner.registry import analysis
from runner.results import JSONValue, StepResult
from runner.step import StepContext, StepOutput

PROBE_TEXT = "Apple Inc. is a worldwide tech company."
"""The probe sentence of the paper and of the seed scripts."""


class SuperWeightsParams(BaseModel):
    """Parameters of ``super_weights`` (the seed's flags; its ``--perplexity-samples`` is the spec's
    ``dataset.max_passages``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    spike_threshold: float = Field(default=50.0, gt=0)
    """A layer yields a candidate when both its largest |down-projection input| and its largest
    |down-projection output| on the probe exceed this value (the paper's and the seed's 50)."""

    max_iterations: int = Field(default=10, ge=1)
    """Most probe passes: each zeroes everything found so far and looks again. Detection stops
    earlier when a pass finds nothing new."""

    probe_text: str = Field(default=PROBE_TEXT, min_length=1)
    """The text whose activations are inspected (the paper's sentence by default)."""

    prepend_bos: bool | None = None
    """Start the probe with BOS. Default: as the model's tokenizer does (``cfg.default_prepend_bos``)."""

    layers: Indices | None = None
    """Layers to search, e.g. ``"0-26"``. Default: every layer. Controls and perplexity are unaffected."""

    perplexity: bool = True
    """Measure perplexity on the spec's dataset (baseline, each weight zeroed, all zeroed, controls,
    restored). ``false`` is the seed's ``--skip-perplexity``: detection only."""

    control_each: bool = False
    """Also zero each weight's two controls alone (two more perplexity passes per weight). By default
    the controls are zeroed together, as a set matched to the super weights."""

    accuracy_tasks: tuple[str, ...] = ()
    """lm-evaluation-harness tasks scored with the model as loaded, with every super weight zeroed, and
    with the matched random coordinates zeroed (the seed's ``--accuracy-tasks``: ``[hellaswag, arc_easy,
    mmlu, gsm8k]``). Empty: no accuracy. Needs ``pip install lm-eval``, and a model loaded by Hugging Face
    id or checkpoint directory, or of the Llama architecture; the standard tasks download their data
    from the Hugging Face hub."""

    accuracy_samples: int = Field(default=100, ge=1)
    """Examples per task (lm-eval's ``limit``; the seed's ``--accuracy-samples``)."""

    task_dir: str | None = None
    """A folder of your own lm-eval task YAML files (lm-eval's ``include_path``), relative to the spec file.
    Tasks defined there need no hub when their data files are local."""

    batch_size: int = Field(default=8, ge=1)
    """Passages per forward pass for perplexity, and lm-eval's batch size. Results do not depend on it."""

    top_candidates: int = Field(default=5, ge=1)
    """How many layers with the strongest spikes of the first probe pass the summary lists as
    ``top_candidates`` (useful when nothing passes the threshold)."""


class WeightRecord(BaseModel):
    """One detected super weight: ``down_proj.weight[row, col]`` of ``layer``, and what revealed it."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    layer: int
    row: int
    """Output channel: a d_model dimension of the residual stream."""
    col: int
    """Input channel: the MLP neuron (a d_mlp dimension)."""
    value: float
    """The weight's value."""
    iteration: int
    """The probe pass (0-based) that found it."""
    input_value: float
    """The down projection's largest |input| in that pass (neuron ``col``'s activation)."""
    output_value: float
    """The down projection's largest |output| in that pass (channel ``row``)."""
    ppl: float | None = None
    """Perplexity with this weight alone zeroed (with ``perplexity: true``)."""
    ppl_ratio: float | None = None
    """``ppl`` over the baseline perplexity."""


class PerplexityImpact(BaseModel):
    """Perplexity on the spec's dataset as loaded, with the super weights zeroed, with the controls zeroed."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    baseline: float
    all_zeroed: float | None
    """With every super weight zeroed (None when none was found)."""
    ratio_all: float | None
    max_single_ratio: float | None
    random_control: float | None
    """With the matched random coordinates zeroed."""
    random_control_ratio: float | None
    magnitude_control: float | None
    """With the matched largest ordinary weights zeroed."""
    magnitude_control_ratio: float | None
    restored: float | None
    """After restoring every weight: equal to ``baseline`` (None when no weight was found to zero)."""
    restored_exact: bool | None
    """``restored == baseline`` bit for bit (the same computation on the same weights)."""
    weights_restored_exact: bool | None
    n_tokens: int
    """Tokens scored."""


class SuperWeightsResult(StepResult):
    """What ``super_weights`` found and measured; ``super_weight_vocab`` and the comparison read it."""

    model: str
    n_found: int
    weights: list[WeightRecord]
    """Every super weight found, in order of discovery."""
    strongest: WeightRecord | None
    """The one with the largest perplexity ratio (or |output spike| without perplexity)."""
    ppl: PerplexityImpact | None
    """None with ``perplexity: false``."""
    controls: JSONValue
    """The control coordinates (``random``, ``magnitude``) with their values and perplexities."""
    accuracy: JSONValue
    """Per lm-eval task: metric, n, baseline, all_zeroed, random_control, drops (None without tasks)."""
    converged: bool
    """Whether the last probe pass found nothing new (else ``max_iterations`` stopped it)."""
    iterations: int
    spike_threshold: float
    probe_tokens: JSONValue
    top_candidates: JSONValue
    """The first pass's strongest layers (useful when nothing passed the threshold)."""
    dataset: JSONValue = None
    """Name, fingerprint, passages and length of the data perplexity was measured on."""


@analysis("super_weights", params=SuperWeightsParams, result=SuperWeightsResult)
def super_weights(ctx: StepContext, params: SuperWeightsParams) -> StepOutput:
    """Detect super weights on a probe text; measure what zeroing them does to perplexity (and accuracy)."""
    from analyses.super_weights.compute import run

    return run(ctx, params)
