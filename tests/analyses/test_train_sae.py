"""train_sae on a tiny model: the written folder is an SAELens SAE; its quality is recomputed here."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from analyses.train_sae import TrainSaeParams, TrainSaeResult, train_sae
from runner.artifacts import RunFolder
from runner.datasets import TokenDataset
from runner.errors import ResourceError
from runner.models import LoadedModel
from runner.results import result_bytes, result_from_files
from runner.saes import SAESource
from runner.step import FinishedCase, StepContext, StepOutput

BOS = 1
HOOK = "blocks.1.hook_resid_pre"


def dataset(loaded: LoadedModel, n: int = 20, length: int = 16) -> TokenDataset:
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randint(3, loaded.model.cfg.d_vocab, (n, length), generator=generator)  # (n, T)
    tokens[:, 0] = BOS
    return TokenDataset("random", tokens, "x", {"spec": {"prepend_bos": True}})


def context(loaded: LoadedModel, data: TokenDataset, finished: Any = None) -> StepContext:
    return StepContext.standalone(model=loaded, dataset=data, case_id="train", finished=finished)


def train(loaded: LoadedModel, data: TokenDataset, **params: Any) -> StepOutput:
    defaults = {
        "layer": 1,
        "site": "resid_pre",
        "d_sae": 64,
        "k": 8,
        "epochs": 20,
        "train_batch_size": 64,
        "lr": 4e-3,
        "dead_feature_window": 5,
        "eval_fraction": 0.25,
    }
    return train_sae(context(loaded, data), TrainSaeParams(**{**defaults, **params}))


@pytest.fixture(scope="module")
def data(tiny_model: LoadedModel) -> TokenDataset:
    return dataset(tiny_model)


@pytest.fixture(scope="module")
def trained(tiny_model: LoadedModel, data: TokenDataset) -> StepOutput:
    return train(tiny_model, data)


@pytest.fixture(scope="module")
def folder(trained: StepOutput, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("run")
    RunFolder(root).write_data("train", trained.data)
    return root / "data" / "train"


def held_out(loaded: LoadedModel, data: TokenDataset) -> tuple[torch.Tensor, torch.Tensor]:
    """The last quarter of the passages and their activations at HOOK (BOS left out)."""
    passages = data.tokens[-5:]
    with torch.no_grad():
        _, cache = loaded.model.run_with_cache(passages, padding_side="right")
    return passages, cache[HOOK][:, 1:].flatten(0, 1).double()  # (N, d_in)


def test_written_folder_is_an_sae_lens_directory(folder: Path, trained: StepOutput) -> None:
    from sae_lens import SAE

    sae = SAE.load_from_disk(folder)
    assert sae.cfg.metadata.hook_name == HOOK
    assert sae.cfg.metadata.model_name == "tiny"
    assert sae.cfg.architecture() == "jumprelu"  # BatchTopK SAEs are saved as JumpReLU, as SAELens does
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (32, 64)
    assert {"sparsity.safetensors", "quality.json", "training_log.csv"} <= {p.name for p in folder.iterdir()}


def test_quality_matches_an_independent_computation(
    folder: Path, trained: StepOutput, tiny_model: LoadedModel, data: TokenDataset
) -> None:
    from sae_lens import SAE

    sae = SAE.load_from_disk(folder)
    passages, x = held_out(tiny_model, data)
    with torch.no_grad():
        f = sae.encode(x.float())
        x_hat = sae.decode(f).double()
    total_variance = (x - x.mean(0)).pow(2).sum()
    summary = trained.summary
    assert summary["n_eval_tokens"] == x.shape[0] == 5 * 15
    assert summary["l0"] == pytest.approx((f != 0).sum(-1).float().mean().item(), abs=1e-5)
    assert summary["explained_variance"] == pytest.approx(
        1 - ((x - x_hat).pow(2).sum() / total_variance).item(), abs=1e-4
    )
    assert summary["mse"] == pytest.approx((x - x_hat).pow(2).sum(-1).mean().item(), rel=1e-4)

    def loss(edit: Any) -> float:
        def hook(act: torch.Tensor, hook: Any) -> torch.Tensor:
            out = edit(act)
            out[:, 0] = act[:, 0]  # BOS is left as it is
            return out

        with torch.no_grad():
            return tiny_model.model.run_with_hooks(
                passages, return_type="loss", fwd_hooks=[(HOOK, hook)], padding_side="right"
            ).item()

    clean, spliced, ablated = (
        loss(lambda a: a.clone()),
        loss(lambda a: sae.decode(sae.encode(a))),
        loss(torch.zeros_like),
    )
    assert summary["ce_loss_without_sae"] == pytest.approx(clean, abs=1e-5)
    assert summary["ce_loss_with_sae"] == pytest.approx(spliced, abs=1e-5)
    assert summary["ce_loss_with_ablation"] == pytest.approx(ablated, abs=1e-5)
    # On a random model zero-ablation barely hurts, so the score divides by a tiny gap: compare loosely.
    assert summary["ce_loss_score"] == pytest.approx((ablated - spliced) / (ablated - clean), rel=1e-2)


def test_dead_fraction_counts_features_that_never_fire_in_training(
    folder: Path, trained: StepOutput, tiny_model: LoadedModel, data: TokenDataset
) -> None:
    from sae_lens import SAE

    sae = SAE.load_from_disk(folder)
    with torch.no_grad():
        _, cache = tiny_model.model.run_with_cache(data.tokens[:-5], padding_side="right")
        fired = (sae.encode(cache[HOOK][:, 1:].flatten(0, 1)) > 0).any(0)  # (d_sae,)
    assert trained.summary["dead_fraction_train"] == pytest.approx(1 - fired.float().mean().item(), abs=1e-6)


def test_training_lowers_the_loss(trained: StepOutput) -> None:
    log = trained.data["training_log.csv"]
    assert len(log) == trained.summary["steps"] == 15 * 15 * 20 // 64
    assert sum(r["mse_loss"] for r in log[-5:]) < 0.5 * sum(r["mse_loss"] for r in log[:5])


def test_float16_weights_and_quality_after_rounding(
    tiny_model: LoadedModel, data: TokenDataset, tmp_path: Path
) -> None:
    from sae_lens import SAE

    output = train(tiny_model, data, save_dtype="float16", epochs=2)
    assert {v.dtype for v in output.data["sae_weights.safetensors"].values()} == {torch.float16}
    RunFolder(tmp_path).write_data("case", output.data)
    sae = SAE.load_from_disk(tmp_path / "data" / "case")
    assert sae.W_dec.dtype == torch.float32  # cfg.json says float32: SAELens upcasts on load
    _, x = held_out(tiny_model, data)
    with torch.no_grad():
        x_hat = sae.decode(sae.encode(x.float())).double()
    expected = 1 - ((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    assert output.summary["explained_variance"] == pytest.approx(expected, abs=1e-4)


def test_standard_sae_trains_with_an_l1_penalty(tiny_model: LoadedModel, data: TokenDataset) -> None:
    output = train(tiny_model, data, architecture="standard", l1_coefficient=1.0, epochs=2)
    assert output.data["cfg.json"]["architecture"] == "standard"
    assert output.summary["k"] is None


def test_a_later_step_loads_the_trained_sae(
    trained: StepOutput, tiny_model: LoadedModel, data: TokenDataset
) -> None:
    # As in a run: the later step gets the result reloaded from its JSON and NPZ files.
    reloaded = result_from_files(TrainSaeResult, *result_bytes(trained.result))
    case = FinishedCase("train", "train", "train_sae", None, "tiny", reloaded)
    ctx = context(tiny_model, data, finished={"train": [case]})
    [loaded] = ctx.saes(SAESource(from_step="train"), layers=None, site=None, where="test")
    assert loaded.hook_name == HOOK
    # Loaded from the step's own tensors, through the files: a copy.
    assert torch.equal(loaded.sae.W_dec, trained.data["sae_weights.safetensors"]["W_dec"].float())


def test_a_step_that_trains_no_sae_cannot_feed_an_sae_analysis(
    trained: StepOutput, tiny_model: LoadedModel, data: TokenDataset
) -> None:
    from runner.errors import RunnerError
    from runner.results import StepResult

    class Other(StepResult):
        x: int

    case = FinishedCase("detect", "detect", "super_weights", None, "tiny", Other(x=1))
    ctx = context(tiny_model, data, finished={"detect": [case]})
    with pytest.raises(RunnerError, match="reads step 'detect' as TrainedSAE, but that step runs analysis"):
        ctx.saes(SAESource(from_step="detect"), layers=None, site=None, where="test")


def test_layer_beyond_the_model_is_refused(tiny_model: LoadedModel, data: TokenDataset) -> None:
    with pytest.raises(
        ResourceError, match=r"layer 7 does not exist in model 'tiny', which has 2 layers \(0-1\)"
    ):
        train(tiny_model, data, layer=7)


def test_one_passage_is_too_few(tiny_model: LoadedModel) -> None:
    with pytest.raises(ResourceError, match="needs at least one besides the 1 held out"):
        train(tiny_model, dataset(tiny_model, n=1))


@pytest.mark.parametrize("template", ["train_sae.md.j2", "train_sae.html.j2"])
def test_report_partials_render(
    trained: StepOutput, render_partial: Callable[..., str], template: str
) -> None:
    text = render_partial(trained, template, step_id="train")
    assert f"SAE training: <code>{HOOK}</code>" in text or f"SAE training: `{HOOK}`" in text
    assert "CE loss score" in text and "sae: {from_step: train}" in text
    assert "training_loss" in text and "feature_density" in text
