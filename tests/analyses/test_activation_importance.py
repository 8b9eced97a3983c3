"""activation_importance against independent computations on a tiny random HookedTransformer."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from pydantic import ValidationError

from analyses._lean_forward import checked_lean_forward
from analyses._tensors import normalize, signed_power
from analyses.activation_importance import (
    ActivationImportanceParams,
    ActivationImportanceResult,
    activation_importance,
)
from runner.artifacts import RunFolder
from runner.datasets import TokenDataset
from runner.errors import ResourceError
from runner.hooks import hook_name
from runner.models import LoadedModel
from runner.results import result_bytes, result_from_files
from runner.step import StepContext, StepOutput
from tests.helpers import LEAN_ARCHITECTURES, make_model

SITES = ["mlp_post", "resid_pre", "resid_mid", "resid_post", "mlp_out", "attn_out"]


@pytest.fixture(scope="module")
def loaded(tiny_model: LoadedModel) -> LoadedModel:
    """The shared tiny random 2-layer model (``tests/conftest.py``)."""
    return tiny_model


@pytest.fixture(scope="module")
def dataset(loaded: LoadedModel) -> TokenDataset:
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, loaded.model.cfg.d_vocab, (5, 12), generator=generator)  # (n, max_len)
    return TokenDataset("random", tokens, fingerprint="x")


def run(loaded: LoadedModel, dataset: TokenDataset, **params: Any) -> tuple[StepOutput, StepContext]:
    resources = {"model": loaded, "dataset": dataset}
    ctx = StepContext(case_id="case", seed=0, device="cpu", resources=resources.__getitem__)
    return activation_importance(ctx, ActivationImportanceParams(**params)), ctx


def cached_means(loaded: LoadedModel, tokens: torch.Tensor, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean and mean |x| over batch and positions, from ``run_with_cache``."""
    with torch.no_grad():
        _, cache = loaded.model.run_with_cache(tokens)
    acts = cache[name].double()  # (B, T, D)
    return acts.mean((0, 1)).numpy(), acts.abs().mean((0, 1)).numpy()


def autograd_means(
    loaded: LoadedModel, tokens: torch.Tensor, names: list[str]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Gradient of the summed per-token loss w.r.t. each hooked activation, with plain ``backward``."""
    model = loaded.model
    acts: dict[str, torch.Tensor] = {}

    def keep(act: torch.Tensor, hook: Any) -> None:
        act.retain_grad()
        acts[hook.name] = act

    with torch.enable_grad():
        loss = model.run_with_hooks(
            tokens, return_type="loss", loss_per_token=True, fwd_hooks=[(n, keep) for n in names]
        )
        loss.sum().backward()
    model.zero_grad(set_to_none=True)
    out = {}
    for name in names:
        grad = acts[name].grad
        assert grad is not None, name
        grad = grad.double()  # (B, T, D)
        out[name] = (grad.mean((0, 1)).numpy(), grad.abs().mean((0, 1)).numpy())
    return out


# --- values and gradients against independent computations -------------------------------------


@pytest.mark.parametrize("site", SITES)
def test_values_match_means_of_cached_activations(
    loaded: LoadedModel, dataset: TokenDataset, site: str
) -> None:
    output, _ = run(loaded, dataset, site=site, aggregation_mode="both", normalization="none", batch_size=2)
    for layer in range(loaded.n_layers):
        mean, mean_abs = cached_means(loaded, dataset.tokens, hook_name(site, layer))
        arrays = output.data["consolidated_results.npz"]
        np.testing.assert_allclose(arrays[f"layer_{layer}_mean"], mean, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(arrays[f"layer_{layer}_mean_abs"], mean_abs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("forward", ["lean", "transformer_lens"])
def test_values_stop_after_the_last_chosen_layer(
    loaded: LoadedModel, dataset: TokenDataset, forward: str
) -> None:
    resources = {"model": loaded, "dataset": dataset}
    ctx = StepContext(case_id="case", seed=0, device="cpu", resources=resources.__getitem__)
    # The lean forward's check runs the whole model once per run: done before the hook is added.
    assert checked_lean_forward(ctx, loaded.model, "") is not None
    calls = []
    last = loaded.n_layers - 1
    loaded.model.add_hook(
        hook_name("resid_pre", last), lambda act, hook: calls.append(hook.name), is_permanent=True
    )
    try:
        params = ActivationImportanceParams(
            layers="0", site="resid_post", normalization="none", forward=forward
        )
        activation_importance(ctx, params)
    finally:
        loaded.model.reset_hooks(including_permanent=True)
    assert calls == []


def test_pad_token_ids_are_not_masked_when_tokenizer_pads_left(
    loaded: LoadedModel, dataset: TokenDataset
) -> None:
    tokenizer = loaded.model.tokenizer
    if tokenizer is None or tokenizer.pad_token_id is None:
        pytest.skip("needs a model with a tokenizer that has a pad token")
    tokens = dataset.tokens.clone()
    tokens[:, ::3] = tokenizer.pad_token_id  # (n, max_len): pad ids inside real text, as EOS=PAD gives
    padded = TokenDataset("with-pad-ids", tokens, fingerprint="p")
    expected, _ = cached_means(loaded, tokens, hook_name("resid_post", 0))
    tokenizer.padding_side = "left"
    try:
        output, _ = run(
            loaded, padded, layers="0", site="resid_post", normalization="none", aggregation_mode="mean"
        )
    finally:
        tokenizer.padding_side = "right"
    np.testing.assert_allclose(
        output.data["consolidated_results.npz"]["layer_0_mean"], expected, rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("site", ["mlp_post", "resid_pre", "attn_out"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_gradients_match_autograd_of_summed_loss(
    loaded: LoadedModel, dataset: TokenDataset, site: str, batch_size: int
) -> None:
    names = [hook_name(site, layer) for layer in range(loaded.n_layers)]
    expected = autograd_means(loaded, dataset.tokens, names)
    output, _ = run(
        loaded,
        dataset,
        site=site,
        aggregate_by="gradients",
        aggregation_mode="both",
        normalization="none",
        batch_size=batch_size,
    )
    arrays = output.data["consolidated_results.npz"]
    for layer, name in enumerate(names):
        mean, mean_abs = expected[name]
        atol = 1e-6 * np.abs(mean_abs).max()  # float32 backward: exact up to rounding of the largest terms
        np.testing.assert_allclose(arrays[f"layer_{layer}_mean"], mean, rtol=1e-5, atol=atol)
        np.testing.assert_allclose(arrays[f"layer_{layer}_mean_abs"], mean_abs, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("forward", ["lean", "transformer_lens"])
@pytest.mark.parametrize("aggregate_by", ["values", "gradients"])
def test_llama_blocks_match_transformer_lens_hooks_and_autograd(forward: str, aggregate_by: str) -> None:
    """Rotary, grouped key-value heads, a gated SiLU MLP and RMS norms (SmolLM2's blocks), on either
    forward, against TransformerLens' own cache and autograd of its summed loss."""
    model = make_model(**LEAN_ARCHITECTURES["llama"])
    info = {"n_layers": model.cfg.n_layers, "d_model": model.cfg.d_model, "d_mlp": model.cfg.d_mlp}
    loaded = LoadedModel("tiny-llama", model, None, "tests/helpers.py", info)
    tokens = torch.randint(0, model.cfg.d_vocab, (5, 16), generator=torch.Generator().manual_seed(2))
    dataset = TokenDataset("random", tokens, fingerprint="llama")
    names = [hook_name("mlp_post", layer) for layer in range(loaded.n_layers)]
    if aggregate_by == "values":
        expected = {name: cached_means(loaded, tokens, name) for name in names}
    else:
        expected = autograd_means(loaded, tokens, names)
    output, ctx = run(
        loaded,
        dataset,
        aggregate_by=aggregate_by,
        aggregation_mode="both",
        normalization="none",
        batch_size=2,
        forward=forward,
    )
    assert not any("lean" in note for note in ctx.notes)  # the lean forward passed its check and ran
    arrays = output.data["consolidated_results.npz"]
    for layer, name in enumerate(names):
        mean, mean_abs = expected[name]
        # float32 through other kernels (SDPA, fused rotary): equal up to rounding of the largest terms
        atol = 1e-5 * np.abs(mean_abs).max()
        np.testing.assert_allclose(arrays[f"layer_{layer}_mean"], mean, rtol=1e-4, atol=atol)
        np.testing.assert_allclose(arrays[f"layer_{layer}_mean_abs"], mean_abs, rtol=1e-4, atol=atol)


def test_gradients_do_not_depend_on_batch_size(loaded: LoadedModel, dataset: TokenDataset) -> None:
    params = {"aggregate_by": "gradients", "aggregation_mode": "both", "normalization": "none"}
    one, _ = run(loaded, dataset, batch_size=1, **params)
    three, _ = run(loaded, dataset, batch_size=3, **params)
    for key, values in one.data["consolidated_results.npz"].items():
        atol = 1e-6 * np.abs(values).max()
        np.testing.assert_allclose(three.data["consolidated_results.npz"][key], values, rtol=1e-5, atol=atol)


def test_gradients_leave_parameter_flags_and_grads_untouched(
    loaded: LoadedModel, dataset: TokenDataset
) -> None:
    params = list(loaded.model.parameters())
    params[0].requires_grad_(False)  # a mix of flags, to check each is restored
    try:
        before = [p.requires_grad for p in params]
        run(loaded, dataset, aggregate_by="gradients")
        assert [p.requires_grad for p in params] == before
        assert all(p.grad is None for p in params)
    finally:
        params[0].requires_grad_(True)


# --- power and normalization ------------------------------------------------------------------------


def test_sum_abs_normalization_makes_abs_sum_equal_dimension() -> None:
    x = np.random.default_rng(0).normal(size=37)
    normalized, ok = normalize(x, "sum_abs")
    assert ok
    assert np.abs(normalized).sum() == pytest.approx(37, rel=1e-9)


def test_sum_normalization_makes_sum_equal_dimension() -> None:
    x = np.random.default_rng(0).normal(size=37)
    normalized, ok = normalize(x, "sum")
    assert ok
    assert normalized.sum() == pytest.approx(37, rel=1e-9)


def test_normalization_matches_seed_readme_example() -> None:
    x = np.array([0.5, -0.3, 0.2])
    np.testing.assert_allclose(normalize(x, "sum_abs")[0], [1.5, -0.9, 0.6], rtol=1e-12)
    np.testing.assert_allclose(normalize(x, "sum")[0], [3.75, -2.25, 1.5], rtol=1e-12)
    np.testing.assert_array_equal(normalize(x, "none")[0], x)  # no arithmetic: the values as given


def test_normalization_by_zero_keeps_raw_values() -> None:
    x = np.array([1.0, -1.0])
    normalized, ok = normalize(x, "sum")
    assert not ok
    np.testing.assert_array_equal(normalized, x)  # left as given, no arithmetic


def test_signed_power_matches_seed_readme_example() -> None:
    values = np.array([10.0, 5.0, 1.0, -8.0])
    np.testing.assert_allclose(signed_power(values, 2.0), [100.0, 25.0, 1.0, -64.0])
    np.testing.assert_allclose(signed_power(values, 0.5), [3.16, 2.24, 1.0, -2.83], atol=5e-3)
    np.testing.assert_allclose(signed_power(np.abs(values), 2.0), [100.0, 25.0, 1.0, 64.0])


def test_both_normalizations_hold_per_layer(loaded: LoadedModel, dataset: TokenDataset) -> None:
    output, _ = run(loaded, dataset, aggregation_mode="both", normalization="both", power=2.0)
    for key, values in output.data["consolidated_results.npz"].items():
        target = np.abs(values).sum() if key.endswith("_norm_sum_abs") else values.sum()
        assert target == pytest.approx(values.size, rel=1e-9), key


def test_power_is_applied_before_normalization(loaded: LoadedModel, dataset: TokenDataset) -> None:
    raw, _ = run(loaded, dataset, aggregation_mode="mean", normalization="none")
    powered, _ = run(loaded, dataset, aggregation_mode="mean", normalization="sum_abs", power=2.0)
    x = signed_power(raw.data["consolidated_results.npz"]["layer_0_mean"], 2.0)
    expected = x * x.size / np.abs(x).sum()
    np.testing.assert_allclose(powered.data["consolidated_results.npz"]["layer_0_mean"], expected, rtol=1e-12)


# --- files ----------------------------------------------------------------------------------------


def test_both_by_both_writes_four_seed_named_npy_files_per_layer(
    loaded: LoadedModel, dataset: TokenDataset
) -> None:
    output, _ = run(loaded, dataset, aggregation_mode="both", normalization="both")
    npy = sorted(name for name in output.data if name.endswith(".npy"))
    expected = sorted(
        f"layer_{layer}_{mode}_norm_{norm}_gradients.npy"
        for layer in range(loaded.n_layers)
        for mode in ("mean", "mean_abs")
        for norm in ("sum", "sum_abs")
    )
    assert npy == expected
    keys = sorted(output.data["consolidated_results.npz"])
    assert keys == sorted(name.removesuffix("_gradients.npy") for name in expected)


def test_single_modes_use_the_plain_seed_names(loaded: LoadedModel, dataset: TokenDataset) -> None:
    output, _ = run(loaded, dataset, layers="1", aggregation_mode="mean", normalization="sum")
    assert [name for name in output.data if name.endswith(".npy")] == ["layer_1_mean_gradients.npy"]


def test_written_npz_loads_without_allow_pickle(
    loaded: LoadedModel, dataset: TokenDataset, tmp_path: Path
) -> None:
    output, _ = run(loaded, dataset, aggregation_mode="both")
    RunFolder(tmp_path).write_data("case", output.data)
    with np.load(tmp_path / "data" / "case" / "consolidated_results.npz") as data:
        assert sorted(data.files) == sorted(output.data["consolidated_results.npz"])
        assert data["layer_0_mean_abs"].dtype == np.float64


def test_metadata_has_the_documented_keys(loaded: LoadedModel, dataset: TokenDataset, tmp_path: Path) -> None:
    output, _ = run(loaded, dataset, aggregate_by="gradients", batch_size=2)
    RunFolder(tmp_path).write_data("case", output.data)
    metadata = json.loads((tmp_path / "data" / "case" / "metadata.json").read_text())
    assert set(metadata) >= {
        "analysis_config",
        "layer_statistics",
        "dimension_sizes",
        "timing",
        "files",
        "how_to_load",
    }
    config = metadata["analysis_config"]
    assert {
        "model_name",
        "aggregate_by",
        "aggregation_mode",
        "power",
        "normalization_mode",
        "layers",
        "site",
        "hook_names",
        "num_samples",
        "max_length",
        "batch_size",
        "n_tokens",
    } <= set(config)
    assert (config["num_samples"], config["max_length"], config["n_tokens"]) == (5, 12, 60)
    assert set(metadata["layer_statistics"]["layer_0_mean_abs"]) == {
        "mean",
        "std",
        "max",
        "min",
        "sum_abs",
        "argmax",
    }
    assert metadata["dimension_sizes"] == {
        str(layer): loaded.model.cfg.d_mlp for layer in range(loaded.n_layers)
    }
    assert "allow_pickle=True" not in metadata["how_to_load"]
    assert set(metadata["files"]) == {p.name for p in (tmp_path / "data" / "case").iterdir()}


def test_how_to_load_snippet_runs_in_the_data_folder(
    loaded: LoadedModel, dataset: TokenDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output, _ = run(loaded, dataset)
    RunFolder(tmp_path).write_data("case", output.data)
    monkeypatch.chdir(tmp_path / "data" / "case")
    namespace: dict[str, Any] = {}
    exec(output.data["metadata.json"]["how_to_load"], namespace)
    # The file read back: a copy of the array.
    np.testing.assert_array_equal(namespace["values"], output.data["layer_0_mean_abs_gradients.npy"])
    assert namespace["metadata"]["analysis_config"]["site"] == "mlp_post"


def test_timing_files_report_batches(loaded: LoadedModel, dataset: TokenDataset) -> None:
    output, _ = run(loaded, dataset, batch_size=2)
    stats = output.data["timing_stats.json"]
    assert stats["n_batches"] == len(stats["batch_seconds"]) == 3
    assert "tokens/s" in output.data["timing_summary.txt"]


def test_csv_rows_cover_every_layer_and_variant(loaded: LoadedModel, dataset: TokenDataset) -> None:
    output, _ = run(loaded, dataset, aggregation_mode="both", top_k=3)
    assert len(output.data["per_layer_stats.csv"]) == loaded.n_layers * 2
    assert len(output.data["top_dimensions.csv"]) == loaded.n_layers * 2 * 3


def test_plots_are_figures_named_like_the_seed(
    loaded: LoadedModel, dataset: TokenDataset, tmp_path: Path
) -> None:
    output, _ = run(loaded, dataset, aggregation_mode="both")
    assert {
        "layer_0_mean_abs_hist.png",
        "all_layers_mean_hist.png",
        "all_layers_combined.png",
        "importance_by_layer.png",
    } <= set(output.plots)
    assert all(isinstance(figure, Figure) for figure in output.plots.values())
    written = RunFolder(tmp_path).write_plots("case", output.plots)
    assert all((tmp_path / path).stat().st_size > 0 for path in written)


def test_layer_histograms_false_skips_only_the_per_layer_files(
    loaded: LoadedModel, dataset: TokenDataset
) -> None:
    with_all, _ = run(loaded, dataset, aggregation_mode="both")
    without, _ = run(loaded, dataset, aggregation_mode="both", layer_histograms=False)
    per_layer = {name for name in with_all.plots if name.startswith("layer_")}
    assert len(per_layer) == loaded.n_layers * 2
    assert set(without.plots) == set(with_all.plots) - per_layer


# --- summary --------------------------------------------------------------------------------------


def test_summary_peak_is_largest_abs_value_of_first_variant(
    loaded: LoadedModel, dataset: TokenDataset
) -> None:
    output, _ = run(loaded, dataset, aggregation_mode="both", normalization="none", top_k=4)
    result = output.result
    assert isinstance(result, ActivationImportanceResult)
    assert result.variants == ["mean_abs", "mean"]
    arrays = output.data["consolidated_results.npz"]
    best = max((abs(arrays[f"layer_{layer}_mean_abs"]).max(), layer) for layer in range(loaded.n_layers))
    assert result.peak.layer == best[1]
    assert result.peak.value == pytest.approx(best[0])
    assert result.layers[best[1]]["mean_abs"]["top"][0] == [result.peak.dim, result.peak.value]
    assert len(result.layers[0]["mean"]["top"]) == 4
    # What expectations read: JSON, so layer keys are strings there ("layers[0]" finds "0").
    assert output.summary["layers"]["0"]["mean"]["top"] == result.layers[0]["mean"]["top"]
    json.dumps(output.summary, allow_nan=False)


def test_result_carries_the_importance_vectors_through_its_files(
    loaded: LoadedModel, dataset: TokenDataset
) -> None:
    output, _ = run(loaded, dataset, aggregation_mode="both", normalization="none")
    arrays = output.data["consolidated_results.npz"]
    reloaded = result_from_files(ActivationImportanceResult, *result_bytes(output.result))
    assert reloaded == output.result
    for layer in range(loaded.n_layers):
        for variant in ("mean", "mean_abs"):
            # The same float64 array, written to NPZ and read back: bit-exact.
            np.testing.assert_array_equal(
                reloaded.importance[layer][variant], arrays[f"layer_{layer}_{variant}"]
            )
    assert output.summary["importance"]["0"]["mean"] == {
        "shape": [loaded.model.cfg.d_mlp],
        "dtype": "float64",
    }


# --- parameters -----------------------------------------------------------------------------------


def test_power_list_uses_first_value_and_notes_it(loaded: LoadedModel, dataset: TokenDataset) -> None:
    listed, ctx = run(loaded, dataset, power="0.5,1.0,2.0")
    single, _ = run(loaded, dataset, power=0.5)
    assert any("using the first one, 0.5" in note for note in ctx.notes)
    # Bit-exact: two runs with the same settings on one model and dataset are the same computation.
    for key, values in single.data["consolidated_results.npz"].items():
        np.testing.assert_array_equal(listed.data["consolidated_results.npz"][key], values)


def test_layers_beyond_model_name_the_valid_range(loaded: LoadedModel, dataset: TokenDataset) -> None:
    n = loaded.n_layers
    with pytest.raises(
        ResourceError, match=rf"layers \[{n}, {n + 1}\] do not exist .* has {n} layers \(0-{n - 1}\)"
    ):
        run(loaded, dataset, layers=f"0,{n},{n + 1}")


def test_params_reject_unknown_keys() -> None:
    with pytest.raises(ValidationError, match="normalize_gradients"):
        ActivationImportanceParams.model_validate({"normalize_gradients": "sum"})


@pytest.mark.parametrize(("text", "expected"), [("0-1", (0, 1)), ("0,1", (0, 1)), (None, None)])
def test_params_read_seed_layer_syntax(text: str | None, expected: tuple[int, ...] | None) -> None:
    assert ActivationImportanceParams.model_validate({"layers": text}).layers == expected


def test_params_reject_non_positive_power() -> None:
    with pytest.raises(ValidationError, match="positive"):
        ActivationImportanceParams.model_validate({"power": "1.0,-2"})


# --- report partials ------------------------------------------------------------------------------


def test_markdown_partial_shows_table_and_peak(
    loaded: LoadedModel, dataset: TokenDataset, render_partial: Callable[..., str]
) -> None:
    text = render_partial(run(loaded, dataset, aggregation_mode="both")[0], "activation_importance.md.j2")
    assert text.startswith("### Activation importance")
    assert "| layer | D | mean | std |" in text
    assert "**Peak** (`mean_abs`" in text
    assert "![importance_by_layer](plots/case/importance_by_layer.png)" in text
    assert "![layer_0_mean_hist]" not in text


def test_html_partial_shows_table_and_peak(
    loaded: LoadedModel, dataset: TokenDataset, render_partial: Callable[..., str], tmp_path: Path
) -> None:
    text = render_partial(run(loaded, dataset, aggregation_mode="both")[0], "activation_importance.html.j2")
    assert text.startswith("<h3>Activation importance")
    assert "<th>layer</th><th>D</th>" in text
    assert "<strong>Peak</strong>" in text
    png = (tmp_path / "plots/case/importance_by_layer.png").read_bytes()  # written as a run writes it
    uri = f"data:image/png;base64,{base64.b64encode(png).decode()}"
    assert png.startswith(b"\x89PNG") and f'<img src="{uri}" alt="importance_by_layer">' in text


# --- importance over SAE features -----------------------------------------------------------------


def random_sae(loaded: LoadedModel, hook: str, d_sae: int, folder: Path) -> Any:
    """A random standard SAE at ``hook`` (biases set so that features fire on some positions), saved."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(3)
    d_in = loaded.model.cfg.d_model
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(hook_name=hook)))
    with torch.no_grad():
        sae.W_enc.normal_(0, d_in**-0.5)
        sae.W_dec.normal_(0, d_in**-0.5)
        sae.b_enc.uniform_(-0.5, 0.2)
        sae.b_dec.normal_(0, 0.1)
    sae.save_model(folder)
    return sae.eval()


def spliced_feature_gradients(
    loaded: LoadedModel, tokens: torch.Tensor, hook: str, sae: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and mean |·| over positions of d(summed loss)/d(feature activations), by autograd through
    the SAE spliced in at ``hook`` with its error term kept (SAELens' ``use_error_term``)."""
    features: list[torch.Tensor] = []

    def splice(act: torch.Tensor, hook: Any) -> torch.Tensor:
        f = sae.encode(act.detach()).requires_grad_(True)  # (B, T, d_sae): the leaf
        features.append(f)
        reconstruction = sae.decode(f)
        return reconstruction + (act - reconstruction).detach()  # same values, gradient through f

    loss = loaded.model.run_with_hooks(
        tokens, return_type="loss", loss_per_token=True, fwd_hooks=[(hook, splice)]
    ).sum()
    (grad,) = torch.autograd.grad(loss, features)
    grad = grad.double().flatten(0, 1)  # (B T, d_sae)
    return grad.mean(0).numpy(), grad.abs().mean(0).numpy()


@pytest.mark.parametrize("aggregate_by", ["values", "gradients"])
def test_sae_features_match_encoding_and_spliced_autograd(
    loaded: LoadedModel, dataset: TokenDataset, tmp_path: Path, aggregate_by: str
) -> None:
    hook = hook_name("resid_post", 1)
    sae = random_sae(loaded, hook, 48, tmp_path / "sae")
    resources_ctx = StepContext.standalone(model=loaded, dataset=dataset, spec_dir=tmp_path)
    params = ActivationImportanceParams(
        layers="1",
        site="resid_post",
        sae={"path": "sae"},
        aggregate_by=aggregate_by,
        aggregation_mode="both",
        normalization="none",
        batch_size=2,
    )
    output = activation_importance(resources_ctx, params)
    arrays = output.data["consolidated_results.npz"]
    if aggregate_by == "values":
        with torch.no_grad():
            _, cache = loaded.model.run_with_cache(dataset.tokens)
            f = sae.encode(cache[hook]).double().flatten(0, 1)  # (B T, d_sae)
        mean, mean_abs = f.mean(0).numpy(), f.abs().mean(0).numpy()
    else:
        mean, mean_abs = spliced_feature_gradients(loaded, dataset.tokens, hook, sae)
    assert arrays["layer_1_mean"].shape == (48,)
    atol = 1e-5 * np.abs(mean_abs).max()  # float32: other kernels, equal up to rounding
    np.testing.assert_allclose(arrays["layer_1_mean"], mean, rtol=1e-4, atol=atol)
    np.testing.assert_allclose(arrays["layer_1_mean_abs"], mean_abs, rtol=1e-4, atol=atol)
    assert output.result.dims == {1: 48}
    assert output.result.sae is not None


def test_sae_feature_gradient_is_the_decoder_row_times_the_activation_gradient(
    loaded: LoadedModel, dataset: TokenDataset, tmp_path: Path
) -> None:
    """Where a feature fires, its gradient is W_dec[f] · dLoss/dactivation (the issue's identity),
    checked per position against TransformerLens' own gradient at the hook."""
    from analyses.activation_importance.compute import _feature_gradient
    from runner.saes.loading import LoadedSAE

    hook = hook_name("resid_post", 0)
    sae = random_sae(loaded, hook, 40, tmp_path / "sae")
    kept: dict[str, torch.Tensor] = {}

    def keep(act: torch.Tensor, hook: Any) -> torch.Tensor:
        act = act.detach().requires_grad_(True)
        kept["act"] = act
        return act

    loss = loaded.model.run_with_hooks(
        dataset.tokens, return_type="loss", loss_per_token=True, fwd_hooks=[(hook, keep)]
    ).sum()
    (grad_act,) = torch.autograd.grad(loss, [kept["act"]])  # (B, T, d)
    loaded_sae = LoadedSAE(sae=sae, layer=0, site="resid_post", hook_name=hook, sae_hook=hook, source="test")
    got = _feature_gradient(loaded_sae, kept["act"].detach(), grad_act)  # (B, T, d_sae)
    with torch.no_grad():
        fires = sae.encode(kept["act"]) > 0  # (B, T, d_sae)
    assert fires.any() and not fires.all()
    by_hand = torch.einsum("btd,fd->btf", grad_act.double(), sae.W_dec.detach().double())
    np.testing.assert_allclose(got[fires].numpy(), by_hand[fires].numpy(), rtol=1e-5, atol=1e-7)
