"""magnitude_sweep on hand-set toy models: closed forms, the batched sweep against a loop, CI gates on a
hand-built decomposition, located errors; magnitude_sweep_lm on the tiny TransformerLens model."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from analyses._spd import Decomposition, SpdConfig, spd_tensors
from analyses._toy_model import CONFIG_FILE, WEIGHTS_FILE, ResidMLP, ToyConfig, toy_tensors
from analyses.magnitude_sweep import (
    MagnitudeSweepLmParams,
    MagnitudeSweepParams,
    MagnitudeSweepResult,
    magnitude_sweep,
    magnitude_sweep_lm,
)
from analyses.magnitude_sweep.toy import magnitudes_of, sweep
from runner.errors import ResourceError
from runner.models import LoadedModel
from runner.step import StepContext, StepOutput

W_IN = np.array([[1.0, -0.5, 0.0], [-2.0, 0.25, 1.0]])  # (d_mlp, d_embed)
W_OUT = np.array([[0.5, -1.0], [1.5, 0.0], [0.0, 2.0]])  # (d_embed, d_mlp)


def hand_set_model() -> ResidMLP:
    """Identity embedding and read-off, two hand-set neurons: every value has a closed form."""
    model = ResidMLP(ToyConfig(n_features=3, d_embed=3, d_mlp=2, n_layers=1))
    with torch.no_grad():
        model.W_E.copy_(torch.eye(3))
        model.W_U.copy_(torch.eye(3))
        model.layers[0].mlp_in.weight.copy_(torch.tensor(W_IN))
        model.layers[0].mlp_out.weight.copy_(torch.tensor(W_OUT))
    return model.requires_grad_(False).eval()


def hand_built_decomposition() -> Decomposition:
    """mlp_in as two rank-one components, each read by a gate ``1 -> 1 -> 1`` with hand-set weights."""
    model = hand_set_model()
    config = SpdConfig(toy=model.config, modules=("layers.0.mlp_in", "layers.0.mlp_out"), C=2, ci_hidden=(1,))
    dec = Decomposition(model, config, torch.Generator().manual_seed(0))
    with torch.no_grad():
        dec.V["layers-0-mlp_in"].copy_(torch.tensor(W_IN.T))  # (d_in, C): component c reads row c of W_in
        dec.U["layers-0-mlp_in"].copy_(torch.eye(2))  # (C, d_out)
        gates = dec.gates["layers-0-mlp_in"]
        gates.W[0].copy_(torch.tensor([[[2.0]], [[-3.0]]]))  # (C, 1, 1)
        gates.b[0].copy_(torch.tensor([[0.5], [0.0]]))
        gates.W[1].copy_(torch.tensor([[[0.8]], [[1.0]]]))  # (C, 1, 1)
        gates.b[1].copy_(torch.tensor([[-0.2], [0.1]]))
        # mlp_out: one component per neuron (V = I, U = W_out^T), gates always at CI 1 (output 0 x h + 5).
        dec.V["layers-0-mlp_out"].copy_(torch.eye(2))
        dec.U["layers-0-mlp_out"].copy_(torch.tensor(W_OUT.T))
        out_gates = dec.gates["layers-0-mlp_out"]
        out_gates.W[1].zero_()
        out_gates.b[1].fill_(5.0)
    return dec.requires_grad_(False).eval()


def save_checkpoint(
    folder: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any], name: str
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / name[1]))
    (folder / name[0]).write_text(__import__("json").dumps(config))
    return folder


def gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def run_toy(tmp_path: Path, model: ResidMLP | Decomposition, **params: Any) -> StepOutput:
    if isinstance(model, Decomposition):
        folder = save_checkpoint(
            tmp_path / "ckpt",
            spd_tensors(model),
            model.config.to_json(),
            ("spd_config.json", "spd_model.safetensors"),
        )
    else:
        folder = save_checkpoint(
            tmp_path / "ckpt", toy_tensors(model), model.config.to_json(), (CONFIG_FILE, WEIGHTS_FILE)
        )
    ctx = StepContext.standalone(case_id="sweep", spec_dir=tmp_path)
    return magnitude_sweep(
        ctx, MagnitudeSweepParams(source={"path": folder.name}, n_steps=21, dpi=40, **params)
    )


def test_swept_neurons_and_output_equal_the_closed_form(tmp_path: Path) -> None:
    output = run_toy(tmp_path, hand_set_model(), feature_idx=1)
    result = output.result
    assert isinstance(result, MagnitudeSweepResult)
    m = np.linspace(-2, 2, 21)
    neurons = np.maximum(np.outer(m, W_IN[:, 1]), 0)  # (n_steps, d_mlp): relu(m * W_in[:, feature])
    outputs = np.outer(m, np.eye(3)[1]) + neurons @ W_OUT.T  # residual m e_1 plus the MLP's output
    # float32 products of a few exact binary fractions: equal up to float32 rounding of m.
    np.testing.assert_allclose(result.neurons[0], neurons, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(result.outputs, outputs, rtol=1e-6, atol=1e-6)
    assert result.output_slopes["positive"] == pytest.approx(
        1 + W_OUT[1] @ np.maximum(W_IN[:, 1], 0), rel=1e-5
    )
    assert result.output_slopes["negative"] == pytest.approx(
        1 + W_OUT[1] @ np.minimum(W_IN[:, 1], 0), rel=1e-5
    )
    assert sorted(output.plots) == ["unified_grid_feature_1_layers_0.png"]
    assert not result.has_components


def test_pre_activation_records_neurons_before_the_relu(tmp_path: Path) -> None:
    result = run_toy(tmp_path, hand_set_model(), feature_idx=0, pre_activation=True, range="positive").result
    assert isinstance(result, MagnitudeSweepResult)
    np.testing.assert_allclose(
        result.neurons[0], np.outer(np.linspace(0, 2, 21), W_IN[:, 0]), rtol=1e-6, atol=1e-6
    )
    assert result.output_slopes["negative"] is None


def test_batched_sweep_equals_a_step_by_step_loop() -> None:
    dec = hand_built_decomposition()
    magnitudes = magnitudes_of(MagnitudeSweepParams(n_steps=17, max_magnitude=1.5))
    batched = sweep(dec.target, dec, 0, magnitudes)
    for s, m in enumerate(magnitudes):
        one = sweep(dec.target, dec, 0, m.reshape(1))
        # A batch of 17 rows against one row: the same operations, possibly other matmul kernels, so
        # equal to float32 rounding (rtol 1e-6 of values of order 1).
        torch.testing.assert_close(one.outputs[0], batched.outputs[s], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(one.neurons[0][0], batched.neurons[0][s], rtol=1e-6, atol=1e-6)
        for name in dec.config.modules:
            torch.testing.assert_close(
                one.pre_sigmoid[name][0], batched.pre_sigmoid[name][s], rtol=1e-6, atol=1e-6
            )


def test_ci_gates_of_a_hand_built_decomposition_follow_their_formula(tmp_path: Path) -> None:
    result = run_toy(tmp_path, hand_built_decomposition(), feature_idx=0, components=True).result
    assert isinstance(result, MagnitudeSweepResult)
    m = np.linspace(-2, 2, 21)
    inner = np.outer(m, W_IN[:, 0])  # (n_steps, C): component c's inner act is m * W_in[c, 0]
    w1, b1, w2, b2 = np.array([2.0, -3.0]), np.array([0.5, 0.0]), np.array([0.8, 1.0]), np.array([-0.2, 0.1])
    pre = w2 * gelu(w1 * inner + b1) + b2
    name = "layers.0.mlp_in"
    np.testing.assert_allclose(result.gate_inputs[name], inner, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(result.pre_sigmoid[name], pre, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.ci[name], np.clip(pre, 0, 1), rtol=1e-5, atol=1e-6)
    expected_active = [
        c
        for c in np.argsort(-np.clip(pre, 0, 1).max(0), kind="stable")
        if np.clip(pre, 0, 1)[:, c].max() > 0.1
    ]
    assert result.active_components[name] == [int(c) for c in expected_active]
    # The components masked by their CI: neuron c = relu(ci_c * m * W_in[c, 0]).
    masked_neurons = np.maximum(np.clip(pre, 0, 1) * inner, 0)
    expected = np.outer(m, np.eye(3)[0]) + masked_neurons @ W_OUT.T
    np.testing.assert_allclose(result.ci["layers.0.mlp_out"], 1.0)
    assert result.component_output is not None
    np.testing.assert_allclose(result.component_output, expected, rtol=1e-5, atol=1e-6)


def test_ablation_zeroes_one_component_and_fits_both_slopes(tmp_path: Path) -> None:
    output = run_toy(tmp_path, hand_built_decomposition(), feature_idx=0, ablation=True)
    result = output.result
    assert isinstance(result, MagnitudeSweepResult)
    n_active = sum(len(v) for v in result.active_components.values())
    assert len(result.ablations) == n_active and n_active > 0
    first = result.ablations[0]
    key = f"{first.module}/{first.component}"
    y = result.ablation_outputs[key]
    m = result.magnitudes  # the float32 magnitudes the fit used: the same computation, so rel 1e-9
    assert first.slope_positive == pytest.approx(np.polyfit(m[m >= 0], y[m >= 0], 1)[0], rel=1e-9)
    assert first.slope_negative == pytest.approx(np.polyfit(m[m <= 0], y[m <= 0], 1)[0], rel=1e-9)
    folder = f"ablation_{first.module.replace('.', '_')}_component_{first.component}"
    assert f"{folder}/unified_grid_feature_0_layers_0_mlp_in.png" in output.plots


def test_feature_index_out_of_range_is_a_located_error(tmp_path: Path) -> None:
    with pytest.raises(ResourceError) as error:
        run_toy(tmp_path, hand_set_model(), feature_idx=3)
    message = str(error.value)
    assert message.startswith("magnitude_sweep case sweep: feature_idx 3 is out of range")
    assert "has 3 features (0-2)" in message and "Set `feature_idx`" in message


def test_a_model_without_gates_asked_for_ci_plots_is_a_located_error(tmp_path: Path) -> None:
    with pytest.raises(ResourceError) as error:
        run_toy(tmp_path, hand_set_model(), components=True)
    message = str(error.value)
    assert message.startswith("magnitude_sweep case sweep: `components: true` needs causal-importance gates")
    assert "bare toy model" in message and "decompose_spd" in message


def test_a_missing_checkpoint_is_a_located_error(tmp_path: Path) -> None:
    ctx = StepContext.standalone(case_id="sweep", spec_dir=tmp_path)
    with pytest.raises(ResourceError) as error:
        magnitude_sweep(ctx, MagnitudeSweepParams(source={"path": "runs/nowhere"}))
    message = str(error.value)
    assert message.startswith(
        f"magnitude_sweep case sweep: `source.path` {tmp_path / 'runs/nowhere'} does not exist"
    )
    assert "spd_config.json" in message and "relative to the spec file" in message


def test_report_partial_lists_active_components_and_ablations(
    tmp_path: Path, render_partial: Callable[..., str]
) -> None:
    output = run_toy(tmp_path, hand_built_decomposition(), feature_idx=0, ablation=True)
    text = render_partial(output, "magnitude_sweep.md.j2", step_id="sweep")
    assert "### Magnitude sweep of feature 0" in text
    assert "| `layers.0.mlp_in` |" in text and "Ablations" in text


def test_lm_sweep_adds_to_the_neuron_and_reads_later_layers(tiny_model: LoadedModel) -> None:
    ctx = StepContext.standalone(model=tiny_model, case_id="lm")
    params = MagnitudeSweepLmParams(
        direction={"neuron": (0, 5)},
        prompt="def f(x): return x",
        n_steps=9,
        max_magnitude=4.0,
        dpi=40,
        top_tokens=2,
    )
    result = magnitude_sweep_lm(ctx, params).result
    m = np.linspace(-4, 4, 9)
    neuron = result.neurons[0][:, 5]  # type: ignore[attr-defined]
    # The hook adds m to the recorded value: baseline + m, in float32.
    np.testing.assert_allclose(neuron, result.baseline_value + m, rtol=1e-6, atol=1e-5)  # type: ignore[attr-defined]
    assert sorted(result.neurons) == [0, 1]  # type: ignore[attr-defined]
    assert result.top_neurons[0] == (0, 5)  # type: ignore[attr-defined]
    assert result.logits.shape == (9, len(result.tokens))  # type: ignore[attr-defined]


def test_lm_sweep_refuses_a_neuron_that_does_not_exist(tiny_model: LoadedModel) -> None:
    ctx = StepContext.standalone(model=tiny_model, case_id="lm")
    with pytest.raises(
        ResourceError, match=r"`direction.neuron` 64 is out of range: the model has 64 neurons"
    ):
        magnitude_sweep_lm(ctx, MagnitudeSweepLmParams(direction={"neuron": (1, 64)}))
