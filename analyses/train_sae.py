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

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from matplotlib.figure import Figure
from pydantic import BaseModel, ConfigDict, Field

from analyses._sae_tensors import PADDING, capture, eligible_positions, logits_from_resid, stop_layer
from runner.errors import ResourceError
from runner.registry import analysis
from runner.saes import sae_hook_name
from runner.step import StepContext, StepOutput

if TYPE_CHECKING:
    from sae_lens import SAE, TrainingSAE
    from transformer_lens import HookedTransformer

__all__ = ["TrainSaeParams", "train_sae"]

Site = Literal["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "mlp_post"]


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


@dataclass
class Activations:
    """Activations at the hook (eligible positions only), split by passage."""

    train: torch.Tensor
    """``(N_train, d_in)``."""
    eval_passages: torch.Tensor
    """``(n_eval, T)`` token ids of the held-out passages."""
    eval: torch.Tensor
    """``(N_eval, d_in)``."""
    seconds: float


@dataclass
class TrainingLog:
    """Per-step losses recorded during training."""

    rows: list[dict[str, float]] = field(default_factory=list)


@analysis("train_sae", params=TrainSaeParams)
def train_sae(ctx: StepContext, params: TrainSaeParams) -> StepOutput:
    """Train an SAE with SAELens on one hook; report L0, explained variance, CE loss, dead features."""
    hook = _hook(ctx, params)
    started = time.perf_counter()
    acts = _collect(ctx, params, hook)
    sae, log, train_seconds = _train(ctx, params, hook, acts)
    inference = _inference_sae(sae, params)
    quality = _quality(ctx, params, hook, inference, acts)
    seconds = {"activations": acts.seconds, "training": train_seconds, "total": time.perf_counter() - started}
    return _output(ctx, params, hook, inference, acts, log, quality, seconds)


def _hook(ctx: StepContext, params: TrainSaeParams) -> str:
    n_layers = ctx.model.n_layers
    if params.layer >= n_layers:
        raise ResourceError(
            f"train_sae case {ctx.case_id}: layer {params.layer} does not exist in model {ctx.model.name!r}, "
            f"which has {n_layers} layers (0-{n_layers - 1}).\nSet `layer` within that range."
        )
    return sae_hook_name(params.site, params.layer)


# ----------------------------------------------------------------------------------------------
# Activations


def _collect(ctx: StepContext, params: TrainSaeParams, hook: str) -> Activations:
    """Read the hook over every passage (stopping after its layer): training passages, then held-out ones."""
    dataset = ctx.dataset
    n_eval = max(1, round(len(dataset) * params.eval_fraction))
    if len(dataset) - n_eval < 1:
        raise ResourceError(
            f"train_sae case {ctx.case_id}: the dataset has {len(dataset)} passages; training needs at least "
            f"one besides the {n_eval} held out.\nRaise `dataset.max_passages`."
        )
    started = time.perf_counter()
    train_passages, eval_passages = dataset.tokens[:-n_eval], dataset.tokens[-n_eval:]
    train = _read(ctx, params, hook, train_passages)
    held_out = _read(ctx, params, hook, eval_passages)
    return Activations(train, eval_passages, held_out, time.perf_counter() - started)


def _read(ctx: StepContext, params: TrainSaeParams, hook: str, passages: torch.Tensor) -> torch.Tensor:
    """``(N, d_in)`` float32 activations at every eligible position of ``passages``, on the CPU."""
    model = ctx.model.model
    device = next(model.parameters()).device
    bos = getattr(ctx.model.tokenizer, "bos_token_id", None)
    parts = []
    batches = passages.split(params.batch_size)
    for tokens in ctx.progress(batches, len(batches), "activations"):
        tokens = tokens.to(device)
        acts, _ = capture(model, tokens, [hook], stop_at_layer=stop_layer(hook))
        mask = eligible_positions(tokens, bos, params.exclude_bos)  # (B, T)
        parts.append(acts[hook][mask].float().cpu())  # (n, d_in)
    return torch.cat(parts)


def _batches(train: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Shuffled training batches, epoch after epoch (SAELens' trainer draws as many as it needs)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(train.shape[0], generator=generator)
        for start in range(0, train.shape[0] - batch_size + 1, batch_size):
            yield train[order[start : start + batch_size]]  # (batch_size, d_in)


# ----------------------------------------------------------------------------------------------
# Training


def _sae_config(ctx: StepContext, params: TrainSaeParams, hook: str, d_in: int) -> Any:
    from sae_lens import BatchTopKTrainingSAEConfig, StandardTrainingSAEConfig, TopKTrainingSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    metadata = SAEMetadata(
        model_name=ctx.model.name,
        hook_name=hook,
        hook_head_index=None,
        context_size=ctx.dataset.max_len,
        prepend_bos=bool(ctx.dataset.info.get("spec", {}).get("prepend_bos", True)),
        dataset_path=ctx.dataset.name,
        exclude_special_tokens=params.exclude_bos,
    )
    common = {
        "d_in": d_in,
        "d_sae": params.d_sae,
        "device": ctx.device,
        "normalize_activations": params.normalize_activations,
        "metadata": metadata,
    }
    if params.architecture == "standard":
        return StandardTrainingSAEConfig(l1_coefficient=params.l1_coefficient, **common)
    config = BatchTopKTrainingSAEConfig if params.architecture == "batchtopk" else TopKTrainingSAEConfig
    return config(k=params.k, **common)


def _train(
    ctx: StepContext, params: TrainSaeParams, hook: str, acts: Activations
) -> tuple[TrainingSAE[Any], TrainingLog, float]:
    from sae_lens.config import SAETrainerConfig
    from sae_lens.registry import get_sae_training_class

    n_train = acts.train.shape[0]
    batch_size = min(params.train_batch_size, n_train)
    total = int(n_train * params.epochs) // batch_size * batch_size
    if total == 0:
        raise ResourceError(
            f"train_sae case {ctx.case_id}: {n_train} training activations are too few for one batch of "
            f"{batch_size}.\nRaise `dataset.max_passages` or `epochs`."
        )
    steps = total // batch_size
    torch.manual_seed(ctx.seed)
    config = _sae_config(ctx, params, hook, int(acts.train.shape[1]))
    sae = get_sae_training_class(config.architecture())[0](config)
    norm_batches = min(steps, 100)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=total,
        train_batch_size_samples=batch_size,
        lr=params.lr,
        lr_end=params.lr,  # the constant schedule ignores it (and decays to 0); SAELens requires one
        lr_warm_up_steps=params.lr_warm_up_steps,
        lr_decay_steps=int(steps * params.lr_decay_fraction),
        device=ctx.device,
        dead_feature_window=params.dead_feature_window,
        feature_sampling_window=max(steps, 1),
        n_batches_for_norm_estimate=norm_batches,
    )
    log = TrainingLog()
    expected = steps + (norm_batches if params.normalize_activations != "none" else 0)
    provider = iter(
        ctx.progress(_batches(acts.train, batch_size, ctx.seed), expected, "SAE training batches")
    )
    trainer = _recording_trainer_class()(trainer_cfg, sae, provider, log=log)
    started = time.perf_counter()
    with _quiet_sae_lens_progress():
        trained = trainer.fit()
    return trained, log, time.perf_counter() - started


@functools.cache
def _recording_trainer_class() -> type:
    """SAETrainer subclassed on first use, so that importing this module does not import sae_lens."""
    from sae_lens import SAETrainer

    class RecordingTrainer(SAETrainer):
        """SAELens' trainer, keeping each step's losses (it otherwise logs them only to wandb)."""

        def __init__(self, *args: Any, log: TrainingLog, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._log = log

        def step(self, batch: torch.Tensor) -> Any:
            out = super().step(batch)
            row = {"step": float(self.n_training_steps), "loss": float(out.loss.detach())}
            row.update({name: float(torch.as_tensor(value).detach()) for name, value in out.losses.items()})
            self._log.rows.append(row)
            return out

    return RecordingTrainer


@contextlib.contextmanager
def _quiet_sae_lens_progress() -> Iterator[None]:
    """SAELens draws its own tqdm bar; runner shows progress itself (the training batches)."""
    from sae_lens.training import activation_scaler, sae_trainer
    from tqdm.auto import tqdm

    modules = (sae_trainer, activation_scaler)
    originals = [module.tqdm for module in modules]
    for module in modules:
        module.tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        for module, original in zip(modules, originals, strict=True):
            module.tqdm = original


def _inference_sae(trained: TrainingSAE[Any], params: TrainSaeParams) -> SAE[Any]:
    """The SAE as users load it (BatchTopK becomes JumpReLU), with the saved dtype's rounding applied."""
    from sae_lens import SAE

    state = {k: v.detach().clone() for k, v in trained.state_dict().items()}
    trained.process_state_dict_for_saving_inference(state)
    cfg = trained.cfg.get_inference_sae_cfg_dict()
    cfg["dtype"] = "float32"
    sae = SAE.from_dict(cfg)
    rounded = {k: v.to(getattr(torch, params.save_dtype)).float() for k, v in state.items()}
    sae.load_state_dict(rounded)
    return sae.eval()


# ----------------------------------------------------------------------------------------------
# Quality, the way SAELens' run_evals measures it


def _quality(
    ctx: StepContext, params: TrainSaeParams, hook: str, sae: SAE[Any], acts: Activations
) -> dict[str, Any]:
    from sae_lens.evals import ExplainedVarianceCalculator

    with torch.no_grad():
        variance = ExplainedVarianceCalculator()
        l0, mse, cos, fired_eval = [], [], [], torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
        for chunk in acts.eval.split(4096):
            chunk = chunk.to(ctx.device)
            f = sae.encode(chunk)
            out = sae.decode(f)
            variance.add_batch(sae_output=out, hidden_acts=chunk)
            l0.append((f != 0).sum(-1).float().cpu())
            mse.append((chunk - out).pow(2).sum(-1).cpu())
            cos.append(torch.nn.functional.cosine_similarity(chunk, out, dim=-1).cpu())
            fired_eval |= (f > 0).any(0).cpu()
        frequency = _frequency(sae, acts.train, ctx.device)
    ce = _ce_losses(ctx, params, hook, sae, acts.eval_passages[: params.ce_eval_passages])
    return {
        "l0": float(torch.cat(l0).mean()),
        "explained_variance": float(variance.compute()),
        "mse": float(torch.cat(mse).mean()),
        "cossim": float(torch.cat(cos).mean()),
        **ce,
        "dead_fraction_train": float((frequency == 0).mean()),
        "dead_fraction_eval": float((~fired_eval).float().mean()),
        "frequency": frequency,
    }


def _frequency(sae: SAE[Any], train: torch.Tensor, device: str) -> np.ndarray:
    """``(d_sae,)`` fraction of training activations on which each feature fires."""
    counts = torch.zeros(sae.cfg.d_sae, dtype=torch.int64)
    for chunk in train.split(4096):
        counts += (sae.encode(chunk.to(device)) > 0).sum(0).cpu()
    return counts.numpy() / max(train.shape[0], 1)


def _ce_losses(
    ctx: StepContext, params: TrainSaeParams, hook: str, sae: SAE[Any], passages: torch.Tensor
) -> dict[str, float]:
    """Mean next-token loss on held-out passages: clean, SAE spliced in at the hook, hook zero-ablated."""
    model = ctx.model.model
    device = next(model.parameters()).device
    bos = getattr(ctx.model.tokenizer, "bos_token_id", None)
    replacements: dict[str, Callable[[torch.Tensor], torch.Tensor] | None] = {
        "ce_loss_without_sae": None,
        "ce_loss_with_sae": lambda act: sae.decode(sae.encode(act)).to(act.dtype),
        "ce_loss_with_ablation": torch.zeros_like,
    }
    sums = dict.fromkeys(replacements, 0.0)
    count = 0
    for tokens in passages.split(params.batch_size):
        tokens = tokens.to(device)
        mask = eligible_positions(tokens, bos, params.exclude_bos).unsqueeze(-1)  # (B, T, 1)
        for name, replace in replacements.items():
            sums[name] += _summed_loss(model, tokens, hook, replace, mask)
        count += tokens.shape[0] * (tokens.shape[1] - 1)
    means = {name: total / count for name, total in sums.items()}
    gap = means["ce_loss_with_ablation"] - means["ce_loss_without_sae"]
    means["ce_loss_score"] = (
        (means["ce_loss_with_ablation"] - means["ce_loss_with_sae"]) / gap if gap else float("nan")
    )
    return means


def _summed_loss(
    model: HookedTransformer,
    tokens: torch.Tensor,
    hook: str,
    replace: Callable[[torch.Tensor], torch.Tensor] | None,
    mask: torch.Tensor,
) -> float:
    """Summed next-token loss with the activation at ``hook`` replaced where ``mask`` (B, T, 1) holds."""
    hooks: list[tuple[str | Callable[..., Any], Callable[..., Any]]] = []
    if replace is not None:
        hooks.append((hook, lambda act, hook: torch.where(mask, replace(act), act)))
    with torch.no_grad():
        resid = model.run_with_hooks(
            tokens, stop_at_layer=model.cfg.n_layers, padding_side=PADDING, fwd_hooks=hooks
        )
        logits = logits_from_resid(model, resid[:, :-1]).float()  # (B, T-1, V)
        loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum"
        )
    return float(loss)


# ----------------------------------------------------------------------------------------------
# Output


def _output(
    ctx: StepContext,
    params: TrainSaeParams,
    hook: str,
    sae: SAE[Any],
    acts: Activations,
    log: TrainingLog,
    quality: dict[str, Any],
    seconds: dict[str, float],
) -> StepOutput:
    frequency = quality.pop("frequency")
    dtype = getattr(torch, params.save_dtype)
    weights = {k: v.detach().to(dtype).contiguous().cpu() for k, v in sae.state_dict().items()}
    cfg = sae.cfg.to_dict()
    cfg["dtype"] = "float32"  # weights may be stored as float16; SAELens loads them as float32
    log10_sparsity = torch.log10(torch.tensor(frequency, dtype=torch.float32) + 1e-10)
    summary = {
        "model": ctx.model.name,
        "hook": hook,
        "layer": params.layer,
        "site": params.site,
        "architecture": params.architecture,
        "saved_architecture": cfg["architecture"],
        "d_in": int(sae.cfg.d_in),
        "d_sae": int(sae.cfg.d_sae),
        "k": params.k if params.architecture != "standard" else None,
        "n_train_tokens": int(acts.train.shape[0]),
        "n_eval_tokens": int(acts.eval.shape[0]),
        "n_ce_eval_passages": min(params.ce_eval_passages, int(acts.eval_passages.shape[0])),
        "steps": len(log.rows),
        **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in quality.items()},
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }
    data = {
        "cfg.json": cfg,
        "sae_weights.safetensors": weights,
        "sparsity.safetensors": {"sparsity": log10_sparsity},
        "quality.json": summary,
        "training_log.csv": log.rows,
        "feature_frequency.npy": frequency,
    }
    return StepOutput(summary=summary, data=data, plots=_plots(ctx.model.name, hook, log, frequency))


def _plots(model: str, hook: str, log: TrainingLog, frequency: np.ndarray) -> dict[str, Figure]:
    loss = Figure(figsize=(6, 3.4), layout="constrained")
    ax = loss.add_subplot()
    if log.rows:
        for name in [k for k in log.rows[0] if k != "step"]:
            ax.plot([r["step"] for r in log.rows], [r[name] for r in log.rows], label=name, linewidth=1)
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    ax.set(title=f"{model} · {hook} · SAE training losses", xlabel="step", ylabel="loss (log scale)")
    density = Figure(figsize=(6, 3.4), layout="constrained")
    ax = density.add_subplot()
    alive = frequency[frequency > 0]
    if alive.size:
        ax.hist(np.log10(alive), bins=50, color="tab:blue")
    dead = int((frequency == 0).sum())
    ax.set(
        title=f"{model} · {hook} · feature density ({dead} of {frequency.size} never fire)",
        xlabel="log10(firing frequency on training tokens)",
        ylabel="features",
    )
    return {"training_loss.png": loss, "feature_density.png": density}
