"""Train a sparse autoencoder on one hook of the spec's model, over the spec's dataset, with SAELens.

Activations are read at ``blocks.{layer}.<site>`` (the forward pass stops right after that layer),
every position but a leading BOS token, and split by passage into a training set and a held-out
evaluation set (the last ``eval_fraction`` of the passages). SAELens 6's ``SAETrainer`` trains a
(Batch)TopK or standard (L1) SAE on shuffled training activations for ``epochs`` passes
(Bricken et al. 2023, "Towards Monosemanticity"; Gao et al. 2024, "Scaling and evaluating sparse
autoencoders"; Bussmann et al. 2024, "BatchTopK Sparse Autoencoders").

Quality is reported the way SAELens' ``run_evals`` does, on the held-out passages: L0 (features
active per token), explained variance (``1 - E|x - x̂|² / Var(x)``), MSE and cosine similarity, and
the next-token loss with the SAE's reconstruction spliced in at the hook, against the clean loss and
against zero-ablating the hook (``ce_loss_score = (zero - spliced) / (zero - clean)``: 1 means the
SAE loses nothing). Dead features are those that never fire on the training (or held-out)
activations.

The SAE is returned in SAELens' directory format (``cfg.json``, ``sae_weights.safetensors``,
``sparsity.safetensors``), so ``data/<case id>/`` loads with ``SAE.load_from_disk`` and with
``sae: {path: ...}``; a later step of the same spec reads it with ``sae: {from_step: <step id>}``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from runner.hooks import Site
from runner.registry import analysis
from runner.saes import TrainedSAE
from runner.step import StepContext, StepOutput


class TrainSaeParams(BaseModel):
    """Parameters of ``train_sae``."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    layer: int = Field(default=6, ge=0)
    """The layer whose activations the SAE reconstructs."""

    site: Site = "resid_post"
    """Hook site at that layer: `blocks.{layer}.hook_<site>`; `mlp_post` is `blocks.{layer}.mlp.hook_post`."""

    architecture: Literal["batchtopk", "topk", "standard"] = "batchtopk"
    """`batchtopk` (k active features per token on average over a batch; saved as JumpReLU),
    `topk` (exactly k per token) or `standard` (ReLU with an L1 penalty)."""

    d_sae: int = Field(default=2304, ge=1)
    """Number of features (2304 is 4 x SmolLM2-135M's d_model)."""

    k: int = Field(default=32, ge=1)
    """Active features per token for `topk` and `batchtopk`."""

    l1_coefficient: float = Field(default=5.0, gt=0)
    """Sparsity penalty of `standard` SAEs."""

    epochs: float = Field(default=3.0, gt=0)
    """Passes over the training activations (fractions allowed)."""

    train_batch_size: int = Field(default=1024, ge=1)
    """Activations (tokens) per optimizer step."""

    lr: float = Field(default=4e-4, gt=0)
    """Adam learning rate."""

    lr_warm_up_steps: int = Field(default=0, ge=0)
    """Steps of linear warm-up."""

    lr_decay_fraction: float = Field(default=0.2, ge=0, le=1)
    """Fraction of the steps, at the end, over which the learning rate decays linearly to 0
    (SAELens' constant schedule with a decay)."""

    dead_feature_window: int = Field(default=50, ge=1)
    """Steps without firing after which a feature counts as dead; (Batch)TopK SAEs then train dead
    features on the residual error (the auxiliary loss)."""

    normalize_activations: Literal["none", "expected_average_only_in"] = "expected_average_only_in"
    """`expected_average_only_in` scales inputs to an average norm of sqrt(d_in) during training and
    folds the scale into the saved weights (SAELens' default for new SAEs)."""

    eval_fraction: float = Field(default=0.1, gt=0, lt=1)
    """Fraction of the passages (the last ones) held out for the quality report."""

    ce_eval_passages: int = Field(default=32, ge=1)
    """Held-out passages for the CE losses (three forward passes each); L0 and explained variance use
    every held-out activation."""

    batch_size: int = Field(default=8, ge=1)
    """Passages per forward pass when reading activations and evaluating."""

    exclude_bos: bool = True
    """Leave a passage's leading BOS token out of training and evaluation (its residual stream is an
    outlier that would dominate the loss)."""

    save_dtype: Literal["float32", "float16"] = "float32"
    """Dtype of the saved weights; float16 halves the files, and the quality is measured after rounding."""


class TrainSaeResult(TrainedSAE):
    """The trained SAE (config and weights, read by ``sae: {from_step: ...}``) and its held-out quality."""

    model: str
    hook: str
    layer: int
    site: str
    architecture: str
    saved_architecture: str
    """SAELens' architecture of the saved SAE (BatchTopK is saved as JumpReLU)."""
    d_in: int
    d_sae: int
    k: int | None
    n_train_tokens: int
    n_eval_tokens: int
    n_ce_eval_passages: int
    steps: int
    l0: float
    """Mean active features per held-out token."""
    explained_variance: float
    mse: float
    cossim: float
    ce_loss_without_sae: float
    ce_loss_with_sae: float
    """Held-out next-token loss with the SAE's reconstruction spliced in at the hook."""
    ce_loss_with_ablation: float
    ce_loss_score: float
    """(ablation - with SAE) / (ablation - clean): 1 is perfect."""
    dead_fraction_train: float
    dead_fraction_eval: float
    seconds: dict[str, float]


@analysis("train_sae", params=TrainSaeParams, result=TrainSaeResult)
def train_sae(ctx: StepContext, params: TrainSaeParams) -> StepOutput:
    """Train an SAE with SAELens on one hook; report L0, explained variance, CE loss, dead features."""
    from analyses.train_sae.compute import run

    return run(ctx, params)
