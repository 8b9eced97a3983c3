"""How ``train_sae`` computes; ``__init__.py`` declares it (params, result, registration)."""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from matplotlib.figure import Figure

from analyses._sae_tensors import PADDING, capture, eligible_positions, logits_from_resid, stop_layer
from analyses.train_sae import TrainSaeParams, TrainSaeResult
from runner.errors import ResourceError
from runner.hooks import hook_name, require_layers
from runner.step import StepContext, StepOutput

if TYPE_CHECKING:
    from sae_lens import SAE, TrainingSAE
    from transformer_lens import HookedTransformer

__all__ = ["run"]


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


def run(ctx: StepContext, params: TrainSaeParams) -> StepOutput:
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
    where = f"train_sae case {ctx.case_id}"
    require_layers([params.layer], ctx.model.n_layers, model=ctx.model.name, where=where, field="layer")
    return hook_name(params.site, params.layer)


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
        "quality.json": summary,  # the result without the weights, as the shipped SAE's quality.json
        "training_log.csv": log.rows,
        "feature_frequency.npy": frequency,
    }
    result = TrainSaeResult(**summary, sae_hook=hook, sae_cfg=cfg, sae_weights=weights)
    return StepOutput(result=result, data=data, plots=_plots(ctx.model.name, hook, log, frequency))


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
        title=f"{model} · {hook}\nfeature density ({dead} of {frequency.size} never fire)",
        xlabel="log10(firing frequency on training tokens)",
        ylabel="features",
    )
    return {"training_loss.png": loss, "feature_density.png": density}
