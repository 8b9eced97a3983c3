"""moe_super_weights and the mixture-of-experts helpers, against independent computations on tiny MoE models.

The planted model is a tiny random OLMoE (transformers) saved as a checkpoint directory and loaded
the way users load one, through ``runner.models.load_model`` and TransformerLens' conversion. Every
embedding gets a large component along one direction ``v`` (token ``Z`` gets ``-v``), so layer 0's
router, aligned with ``v``, sends every token but ``Z`` to experts 1 and 2. In expert 1, neuron COL
fires at ~800 on every token and ``down_proj[ROW, COL] = 10`` writes ~8000 into channel ROW: the
super weight. Expert 2 is a decoy whose largest input (neuron DECOY_IN) and largest output (channel
DECOY_ROW) co-occur, but the output comes from another neuron (DECOY_OUT): the dense recipe's
argmax pairing would call ``(DECOY_ROW, DECOY_IN)`` a super weight; the co-spike check must not.
"""

from __future__ import annotations

import copy
import json
import math
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from analyses._moe import measure_expert_peaks, routed_tokens
from analyses._weights import SuperWeight, zeroed
from analyses.moe_super_weights import MoESuperWeightsParams, moe_super_weights
from analyses.moe_super_weights.compute import router_stats
from runner.artifacts import RunFolder
from runner.datasets import TokenDataset
from runner.errors import ResourceError
from runner.models import LoadedModel, load_model
from runner.step import StepContext, StepOutput

D_MODEL, D_MLP, N_EXPERTS, TOP_K = 32, 16, 4, 2
LAYER, EXPERT, ROW, COL = 0, 1, 7, 5
DECOY, DECOY_ROW, DECOY_IN, DECOY_OUT = 2, 11, 3, 9
Z = 2  # the pad token: never in text, so the main datasets route like the probe


# --- models ----------------------------------------------------------------------------------------------


def _plant(model: Any) -> None:
    """Plant the super weight and the decoy in a transformers ``OlmoeForCausalLM`` (HF coordinates)."""
    v = torch.zeros(D_MODEL)
    v[0] = 1.0  # |v| = 1 dwarfs the random embeddings (~0.1): every layer-0 MLP input points along v
    mlp = model.model.layers[LAYER].mlp
    gate_up, down = (
        mlp.experts.gate_up_proj,
        mlp.experts.down_proj,
    )  # (E, 2 d_mlp, d_model), (E, d_model, d_mlp)
    with torch.no_grad():
        model.model.embed_tokens.weight += v
        model.model.embed_tokens.weight[Z] -= 2 * v
        mlp.gate.weight[EXPERT] = 2.2 * v  # router: experts 1 and 2 for every token with +v
        mlp.gate.weight[DECOY] = 2.0 * v
        for expert, neuron, scale in ((EXPERT, COL, 5.0), (DECOY, DECOY_IN, 5.0), (DECOY, DECOY_OUT, 4.5)):
            gate_up[expert, neuron] = scale * v  # gate
            gate_up[expert, D_MLP + neuron] = scale * v  # up: silu(g) * u ≈ 800 (5.0) or ≈ 650 (4.5)
            down[expert, :, neuron] *= 0.01
        down[EXPERT, ROW, COL] = 10.0
        down[DECOY, DECOY_ROW, DECOY_IN] = 0.01  # the largest input writes ~8 into DECOY_ROW...
        down[DECOY, DECOY_ROW, DECOY_OUT] = 0.2  # ...another neuron writes ~130: co-spike ≈ 0.06


@pytest.fixture(scope="module")
def olmoe_dir(tiny_tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The planted tiny OLMoE as a transformers checkpoint directory (weights + tokenizer)."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(0)
    config = OlmoeConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=D_MODEL,
        intermediate_size=D_MLP,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=N_EXPERTS,
        num_experts_per_tok=TOP_K,
        norm_topk_prob=False,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=0,
        pad_token_id=2,
    )
    model = OlmoeForCausalLM(config).eval()
    _plant(model)
    directory = tmp_path_factory.mktemp("planted_olmoe")
    model.save_pretrained(directory)
    tiny_tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def planted(olmoe_dir: Path) -> LoadedModel:
    return load_model(str(olmoe_dir))


@pytest.fixture(scope="module")
def random_moe(tiny_tokenizer: Any) -> LoadedModel:
    """An unplanted random MoE ``HookedTransformer`` (TransformerLens' own MoE config): varied routing."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        model_name="tiny-moe",
        n_layers=2,
        d_model=D_MODEL,
        d_mlp=D_MLP,
        n_heads=4,
        d_head=8,
        n_ctx=64,
        d_vocab=len(tiny_tokenizer),
        act_fn="silu",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        gated_mlp=True,
        num_experts=N_EXPERTS,
        experts_per_token=TOP_K,
        seed=1,
        device="cpu",
    )
    model = HookedTransformer(cfg, tokenizer=tiny_tokenizer).eval()
    return LoadedModel("tiny-moe", model, tiny_tokenizer, "random tiny MoE (test)", {})


@pytest.fixture(scope="module")
def dataset(planted: LoadedModel) -> TokenDataset:
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(Z + 1, planted.model.cfg.d_vocab, (6, 16), generator=generator)  # (n, max_len)
    return TokenDataset("random", tokens, fingerprint="x")


def run(
    loaded: LoadedModel, dataset: TokenDataset, seed: int = 0, **params: Any
) -> tuple[StepOutput, StepContext]:
    resources = {"model": loaded, "dataset": dataset}
    ctx = StepContext(case_id="case", seed=seed, device="cpu", resources=resources.__getitem__)
    return moe_super_weights(ctx, MoESuperWeightsParams(**params)), ctx


def state(model: Any) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def assert_same_state(before: dict[str, torch.Tensor], model: Any) -> None:
    after = model.state_dict()
    # Bit-exact: `zeroed` writes the saved values back, a copy and not a computation.
    assert all(torch.equal(before[name], after[name]) for name in before)


# --- independent computations ------------------------------------------------------------------------------


@dataclass
class Routed:
    """One expert's activations by hand: which flat tokens chose it, its down-projection input and output."""

    tokens: torch.Tensor  # (n,) flat indices into batch * pos, ascending
    post: torch.Tensor  # (n, d_mlp)
    out: torch.Tensor  # (n, d_model)


def mlp_inputs(model: Any, tokens: torch.Tensor, layer: int) -> torch.Tensor:
    """The MoE block's input: ``ln2(resid_mid)``, flattened to ``(batch * pos, d_model)``."""
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=f"blocks.{layer}.hook_resid_mid")
        return model.blocks[layer].ln2(cache[f"blocks.{layer}.hook_resid_mid"]).reshape(-1, D_MODEL)


def routing(model: Any, tokens: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Router probabilities ``softmax(x @ W_gate.T)`` ``(N, E)`` and the top-k experts ``(N, k)``."""
    x = mlp_inputs(model, tokens, layer)
    with torch.no_grad():
        probs = torch.softmax((x @ model.blocks[layer].mlp.W_gate.weight.T).float(), dim=-1)
    return probs, probs.topk(TOP_K, dim=-1).indices


def by_hand(model: Any, tokens: torch.Tensor, layer: int, expert: int) -> Routed:
    """``silu(x W_gate.T) * (x W_in.T)`` and ``post @ W_out.T`` at the tokens whose top-k holds ``expert``."""
    x = mlp_inputs(model, tokens, layer)
    _, top = routing(model, tokens, layer)
    chose = torch.where((top == expert).any(dim=-1))[0]
    module = model.blocks[layer].mlp.experts[expert]
    with torch.no_grad():
        xs = x[chose]
        post = F.silu(xs @ module.W_gate.weight.T) * (xs @ module.W_in.weight.T)  # (n, d_mlp)
        out = post @ module.W_out.weight.T  # (n, d_model)
    return Routed(chose, post, out)


def manual_losses(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy from the logits, by hand: ``-log softmax(logits)[next token]``."""
    with torch.no_grad():
        logits = model(tokens, return_type="logits").double()  # (B, T, vocab)
    log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
    return -log_probs.gather(-1, tokens[:, 1:, None])[..., 0]  # (B, T-1)


def ppl_with(loaded: LoadedModel, tokens: torch.Tensor, zero: list[dict[str, int]]) -> float:
    """Perplexity by hand: copy the model, write 0 into each ``experts[e].W_out.weight[row, col]``."""
    model = copy.deepcopy(loaded.model)
    with torch.no_grad():
        for w in zero:
            model.blocks[w["layer"]].mlp.experts[w["expert"]].W_out.weight[w["row"], w["col"]] = 0.0
    return math.exp(float(manual_losses(model, tokens).mean()))


# --- weights and routing ------------------------------------------------------------------------------------


def test_expert_weight_is_hugging_face_down_proj_untransposed(planted: LoadedModel) -> None:
    w_out = planted.model.blocks[LAYER].mlp.experts[EXPERT].W_out.weight
    assert tuple(w_out.shape) == (D_MODEL, D_MLP)
    weight = SuperWeight(LAYER, ROW, COL, expert=EXPERT)
    assert weight.tensor(planted.model) is w_out and weight.index() == (ROW, COL)
    assert float(w_out.detach()[weight.index()]) == 10.0  # planted as down_proj[EXPERT, ROW, COL]
    assert weight.label() == f"L{LAYER}-E{EXPERT}-R{ROW}-C{COL}"


def test_expert_zeroed_zeroes_inside_and_restores_bit_exact(planted: LoadedModel) -> None:
    model = copy.deepcopy(planted.model)
    before = state(model)
    weights = [SuperWeight(0, ROW, COL, expert=1), SuperWeight(1, 0, 0, expert=3)]
    with zeroed(model, [*weights, weights[0]]):  # the same entry twice
        assert float(model.blocks[0].mlp.experts[1].W_out.weight.detach()[ROW, COL]) == 0.0
        assert float(model.blocks[1].mlp.experts[3].W_out.weight.detach()[0, 0]) == 0.0
        changed = [n for n in before if not torch.equal(before[n], model.state_dict()[n])]
        assert changed == ["blocks.0.mlp.experts.1.W_out.weight", "blocks.1.mlp.experts.3.W_out.weight"]
    assert_same_state(before, model)


def test_expert_zeroed_restores_after_an_exception(planted: LoadedModel) -> None:
    model = copy.deepcopy(planted.model)
    before = state(model)
    with pytest.raises(KeyError), zeroed(model, [SuperWeight(0, 1, 1, expert=2)]):
        raise KeyError("inside")
    assert_same_state(before, model)


def test_routed_tokens_follow_the_order_experts_see_them(random_moe: LoadedModel) -> None:
    """TransformerLens feeds an expert its first-choice tokens, then its second-choice ones."""
    tokens = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(5))
    model = random_moe.model
    _, top = routing(model, tokens, 1)
    seen: dict[int, torch.Tensor] = {}

    def keep(expert: int) -> Any:
        def hook(module: Any, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            seen[expert] = inputs[0].detach()  # the rows the expert receives, in its order

        return hook

    handles = [
        module.W_in.register_forward_hook(keep(e)) for e, module in enumerate(model.blocks[1].mlp.experts)
    ]
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        for handle in handles:
            handle.remove()
    x = mlp_inputs(model, tokens, 1)
    for expert in range(N_EXPERTS):
        order = routed_tokens(top, expert)
        expected = torch.cat([torch.where(top[:, slot] == expert)[0] for slot in range(TOP_K)])
        assert torch.equal(order, expected)
        assert torch.allclose(seen[expert], x[order], atol=1e-6)


def test_router_stats_match_softmax_top_k_of_router_logits(random_moe: LoadedModel) -> None:
    tokens = torch.randint(0, 300, (5, 12), generator=torch.Generator().manual_seed(7))
    stats = router_stats(random_moe.model, tokens, [0, 1], batch_size=2, floor=0.2)
    rows = {(r["layer"], r["expert"]): r for r in stats.rows()}
    for layer in (0, 1):
        probs, top = routing(random_moe.model, tokens, layer)
        n = top.shape[0]
        for expert in range(N_EXPERTS):
            row = rows[(layer, expert)]
            p_active = float((top == expert).any(-1).sum()) / n
            assert row["n_tokens"] == n == 60
            assert row["p_active"] == pytest.approx(p_active, abs=1e-12)
            assert row["top1_fraction"] == pytest.approx(float((top[:, 0] == expert).sum()) / n, abs=1e-12)
            assert row["mean_prob"] == pytest.approx(float(probs[:, expert].mean()), rel=1e-5)
            assert row["rare"] == (p_active < 0.2)
        assert sum(rows[(layer, e)]["p_active"] for e in range(N_EXPERTS)) == pytest.approx(TOP_K)
    assert 0 < min(r["p_active"] for r in rows.values()) < max(r["p_active"] for r in rows.values()) < 1


def test_expert_peaks_are_the_largest_abs_activations_at_routed_tokens(random_moe: LoadedModel) -> None:
    tokens = torch.randint(0, 300, (3, 10), generator=torch.Generator().manual_seed(27))
    peaks = measure_expert_peaks(random_moe.model, [tokens[:2], tokens[2:]], [0, 1])
    sides = [((p.input_source, p.input_at), (p.output_source, p.output_at)) for p in peaks.values()]
    assert any(i[0] != o[0] for i, o in sides)  # input and output peaks in different passes (merging)...
    assert any(i[0] == o[0] and i != o for i, o in sides)  # ...and at different tokens of one pass
    for (layer, expert), peak in peaks.items():
        routed = by_hand(random_moe.model, tokens, layer, expert)
        assert peak.n_routed == len(routed.tokens) > 0
        flat_in = int(routed.post.abs().argmax())
        flat_out = int(routed.out.abs().argmax())
        in_row, in_channel = divmod(flat_in, D_MLP)
        out_row, out_channel = divmod(flat_out, D_MODEL)
        assert peak.input_value == pytest.approx(float(routed.post[in_row, in_channel]), rel=1e-5)
        assert peak.output_value == pytest.approx(float(routed.out[out_row, out_channel]), rel=1e-5)
        assert (peak.input_channel, peak.output_channel) == (in_channel, out_channel)
        # Co-spikes. Other kernels than by hand: an activation is off by a few ulps of the terms it sums,
        # not of itself (a small one comes from cancellation), hence atol: 16 ulps of the largest.
        largest = float(routed.post.abs().max())
        atol = 16 * torch.finfo(torch.float32).eps * largest
        torch.testing.assert_close(peak.input_at_output, routed.post[out_row], rtol=1e-5, atol=atol)

        def where(source: int, at: tuple[int, int]) -> int:  # back to a flat index over all 3 passages
            return (at[0] + 2 * source) * tokens.shape[1] + at[1]

        assert where(peak.input_source, peak.input_at) == int(routed.tokens[in_row])
        assert where(peak.output_source, peak.output_at) == int(routed.tokens[out_row])
    assert len(peaks) == 2 * N_EXPERTS


# --- detection -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def result(planted: LoadedModel, dataset: TokenDataset) -> tuple[StepOutput, StepContext]:
    before = state(planted.model)
    output = run(planted, dataset, causal_scoring=True, batch_size=4)
    assert_same_state(before, planted.model)
    return output


def test_detection_finds_exactly_the_planted_weight(result: tuple[StepOutput, StepContext]) -> None:
    summary = result[0].summary
    found = [(w["layer"], w["expert"], w["row"], w["col"], w["value"]) for w in summary["weights"]]
    assert found == [(LAYER, EXPERT, ROW, COL, 10.0)]
    assert summary["converged"] is True and summary["iterations"] == 2


def test_planted_spikes_and_co_spikes_match_the_expert_computed_by_hand(
    planted: LoadedModel, result: tuple[StepOutput, StepContext]
) -> None:
    probe = planted.model.to_tokens("Apple Inc. is a worldwide tech company.")
    candidates = [c for c in result[0].data["candidates.jsonl"] if c["iteration"] == 0]
    assert {(c["layer"], c["expert"]) for c in candidates} == {(LAYER, EXPERT), (LAYER, DECOY)}
    for candidate in candidates:
        routed = by_hand(planted.model, probe, LAYER, candidate["expert"])
        w_out = planted.model.blocks[LAYER].mlp.experts[candidate["expert"]].W_out.weight.detach()
        t, row = divmod(int(routed.out.abs().argmax()), D_MODEL)
        col = int(routed.post.abs().max(dim=0).values.argmax())
        co_spike = float(routed.post[t, col] * w_out[row, col] / routed.out[t, row])
        assert (candidate["row"], candidate["col"]) == (row, col)
        assert candidate["output_value"] == pytest.approx(float(routed.out[t, row]), rel=1e-5)
        assert candidate["co_spike"] == pytest.approx(co_spike, rel=1e-4)
    by_expert = {c["expert"]: c for c in candidates}
    assert by_expert[EXPERT]["status"] == "super_weight" and by_expert[EXPERT]["co_spike"] > 0.99
    decoy = by_expert[DECOY]
    assert (decoy["row"], decoy["col"], decoy["status"]) == (DECOY_ROW, DECOY_IN, "low_co_spike")
    assert decoy["co_spike"] < 0.12 < abs(decoy["input_value"]) and abs(decoy["output_value"]) > 50


def test_a_low_enough_co_spike_threshold_accepts_the_decoy(
    planted: LoadedModel, dataset: TokenDataset
) -> None:
    output, _ = run(planted, dataset, co_spike_threshold=0.01)
    found = {(w["layer"], w["expert"], w["row"], w["col"]) for w in output.summary["weights"]}
    assert found == {(LAYER, EXPERT, ROW, COL), (LAYER, DECOY, DECOY_ROW, DECOY_IN)}


def test_candidates_of_rarely_routed_experts_are_rejected(planted: LoadedModel) -> None:
    """On text made only of token Z (embedding -v), layer 0 never routes to experts 1 and 2."""
    only_z = TokenDataset("z", torch.full((4, 8), Z), fingerprint="z")
    output, ctx = run(planted, only_z)
    summary = output.summary
    probs, top = routing(planted.model, only_z.tokens, LAYER)
    assert not bool((top == EXPERT).any()) and not bool((top == DECOY).any())
    assert summary["router"]["p_active"][0][EXPERT] == 0.0  # a count of 0: no token goes there (above)
    assert [LAYER, EXPERT] in summary["router"]["rare"]
    assert summary["n_found"] == 0
    assert summary["rejected"] == {"rare_expert": 2, "low_co_spike": 0}
    statuses = {(c["expert"], c["status"]) for c in output.data["candidates.jsonl"]}
    assert statuses == {(EXPERT, "rare_expert"), (DECOY, "rare_expert")}
    assert "No super weight accepted (rejected candidates: 2 rare_expert)" in " ".join(ctx.notes)


def test_nothing_above_the_threshold_lists_top_candidates(
    planted: LoadedModel, dataset: TokenDataset
) -> None:
    output, ctx = run(planted, dataset, spike_threshold=1e6)
    summary = output.summary
    assert summary["n_found"] == 0 and summary["n_candidates"] == 0 and summary["causal"] is None
    top = summary["top_candidates"][0]
    assert (top["layer"], top["expert"], top["row"], top["col"]) == (LAYER, EXPERT, ROW, COL)
    assert top["status"] == "below_threshold"
    assert any("No super weight accepted. Strongest: layer 0 expert 1" in note for note in ctx.notes)


def test_search_passages_route_tokens_to_experts_the_probe_misses(
    random_moe: LoadedModel, dataset: TokenDataset
) -> None:
    probe_only, ctx = run(random_moe, dataset, probe_text="A", prepend_bos=False)
    _, top = routing(random_moe.model, random_moe.model.to_tokens("A", prepend_bos=False), 0)
    missed = N_EXPERTS - len(set(top.flatten().tolist()))  # one token reaches only TOP_K experts
    assert missed == N_EXPERTS - TOP_K
    searched = {(r["layer"], r["expert"]) for r in probe_only.data["expert_spikes.csv"]}
    assert len(searched) == 2 * TOP_K
    assert any(note.startswith(f"{2 * (N_EXPERTS - TOP_K)} experts that are not rare") for note in ctx.notes)
    with_passages, ctx = run(random_moe, dataset, probe_text="A", prepend_bos=False, search_passages=2)
    rows = with_passages.data["expert_spikes.csv"]
    assert len({(r["layer"], r["expert"]) for r in rows}) == 2 * N_EXPERTS
    assert {r["input_text"] for r in rows} <= {"probe", "passage 0", "passage 1"}
    assert not any("not rare" in note for note in ctx.notes)


# --- causal scoring ----------------------------------------------------------------------------------------


def test_causal_scores_match_perplexity_computed_by_hand(
    planted: LoadedModel, dataset: TokenDataset, result: tuple[StepOutput, StepContext]
) -> None:
    summary, data = result[0].summary, result[0].data
    causal = summary["causal"]
    assert causal["baseline"] == pytest.approx(ppl_with(planted, dataset.tokens, []), rel=1e-5)
    weight = summary["weights"][0]
    assert weight["ppl"] == pytest.approx(ppl_with(planted, dataset.tokens, [weight]), rel=1e-5)
    # One super weight: "all zeroed" zeroes the same one on the same batches, the same computation.
    assert causal["all_zeroed"] == pytest.approx(weight["ppl"], rel=1e-12)
    rows = data["causal_scores.csv"]
    assert [(r["expert"], r["status"]) for r in rows] == [(EXPERT, "super_weight"), (DECOY, "low_co_spike")]
    for row in rows:
        control = {k: row[f"control_{k}"] for k in ("layer", "expert", "row", "col")}
        assert (control["layer"], control["expert"]) == (row["layer"], row["expert"])
        assert (control["row"], control["col"]) != (row["row"], row["col"])
        expected = ppl_with(planted, dataset.tokens, [control])
        assert row["control_ppl"] == pytest.approx(expected, rel=1e-5)
        w_out = planted.model.blocks[row["layer"]].mlp.experts[row["expert"]].W_out.weight.detach()
        assert row["control_value"] == float(w_out[control["row"], control["col"]])  # read back
    decoy = rows[1]
    assert decoy["ppl"] == pytest.approx(ppl_with(planted, dataset.tokens, [decoy]), rel=1e-5)


def test_restored_perplexity_equals_baseline_exactly(result: tuple[StepOutput, StepContext]) -> None:
    causal = result[0].summary["causal"]
    # The same computation: one model, its weights written back bit for bit, the same batches.
    assert causal["restored"] == causal["baseline"]
    assert causal["restored_exact"] is True and causal["weights_restored_exact"] is True


def test_random_controls_follow_the_case_seed(planted: LoadedModel, dataset: TokenDataset) -> None:
    def controls(seed: int) -> list[tuple[int, int]]:
        output, _ = run(planted, dataset, seed=seed, causal_scoring=True, max_scored=1, batch_size=6)
        return [(r["control_row"], r["control_col"]) for r in output.data["causal_scores.csv"]]

    assert controls(1) == controls(1)
    assert controls(1) != controls(2)


# --- errors and params --------------------------------------------------------------------------------------


def test_dense_model_is_refused_pointing_at_super_weights(
    tiny_model: LoadedModel, dataset: TokenDataset
) -> None:
    with pytest.raises(ResourceError) as error:
        run(tiny_model, dataset)
    message = str(error.value)
    assert message.startswith("moe_super_weights case case: model 'tiny' is dense")
    assert "use the `super_weights` analysis" in message


def test_layers_beyond_the_model_name_the_moe_layers(planted: LoadedModel, dataset: TokenDataset) -> None:
    with pytest.raises(ResourceError, match=r"layer 4 does not exist .*\n(.*\n)?.*layers are 0-1"):
        run(planted, dataset, layers="0,4")


def test_params_reject_unknown_keys_and_bad_values() -> None:
    with pytest.raises(ValidationError, match="extra"):
        MoESuperWeightsParams(co_spike_treshold=0.1)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="less than or equal to 1"):
        MoESuperWeightsParams(p_active_floor=1.5)
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        MoESuperWeightsParams(router_analysis_samples=0)


def test_defaults_are_the_seeds_flags() -> None:
    params = MoESuperWeightsParams()
    assert (params.router_analysis_samples, params.p_active_floor, params.co_spike_threshold) == (
        10,
        0.01,
        0.12,
    )
    assert (params.spike_threshold, params.max_iterations, params.causal_scoring) == (50.0, 10, False)
    assert all(field.description for field in MoESuperWeightsParams.model_fields.values())


# --- files and report ---------------------------------------------------------------------------------------


def test_data_files_and_plots_are_written(result: tuple[StepOutput, StepContext], tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    folder.write_data("case", result[0].data)
    folder.write_plots("case", result[0].plots)
    data = tmp_path / "data/case"
    router = (data / "router_stats.csv").read_text().splitlines()
    assert router[0] == "layer,expert,n_tokens,selected,p_active,top1_fraction,mean_prob,rare"
    assert router[1 + EXPERT].startswith(f"0,{EXPERT},96,96,1.0,")  # 6 x 16 tokens, all routed to it
    layer0 = json.loads((data / "router_stats.json").read_text())["layers"][0]
    assert layer0["rare_experts"] == [0, 3] and layer0["p_active"] == [0.0, 1.0, 1.0, 0.0]
    lines = [json.loads(line) for line in (data / "candidates.jsonl").read_text().splitlines()]
    assert [(c["iteration"], c["expert"], c["status"]) for c in lines] == [
        (0, EXPERT, "super_weight"),
        (0, DECOY, "low_co_spike"),
        (1, DECOY, "low_co_spike"),
    ]
    weights = (data / "super_weights.csv").read_text().splitlines()
    assert weights[1].startswith(f"0,{LAYER},{EXPERT},{ROW},{COL},")
    assert {"expert_spikes.csv", "candidates.csv", "causal_scores.csv", "analysis.json"} <= {
        p.name for p in data.iterdir()
    }
    for plot in ("moe_analysis.png", "causal_scores.png"):
        assert (tmp_path / "plots/case" / plot).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("template", ["moe_super_weights.md.j2", "moe_super_weights.html.j2"])
def test_report_partial_lists_weights_router_and_causal_scores(
    result: tuple[StepOutput, StepContext], render_partial: Callable[..., str], template: str
) -> None:
    text = render_partial(result[0], template)
    summary = result[0].summary
    assert "Mixture-of-experts super weights of" in text
    assert "4 rare experts below the floor (L0 E0, L0 E3, L1 E1, L1 E2)" in text
    assert "1 super weight" in text and "with a low co-spike were rejected" in text
    assert f"{summary['causal']['baseline']:.4g}" in text and "exactly the baseline" in text
    assert "moe_analysis" in text
    if template.endswith(".md.j2"):  # the HTML report lists every case's data files itself
        assert "router_stats.csv" in text


@pytest.mark.parametrize("template", ["moe_super_weights.md.j2", "moe_super_weights.html.j2"])
def test_report_partial_without_super_weights_lists_top_candidates(
    planted: LoadedModel, render_partial: Callable[..., str], template: str
) -> None:
    output, _ = run(planted, TokenDataset("z", torch.full((2, 8), Z), fingerprint="z"))
    text = render_partial(output, template)
    assert "No super weight accepted (2 candidates: 2 in rare experts, 0 with a low co-spike)" in text
    assert "rare_expert" in text


# --- end to end ---------------------------------------------------------------------------------------------


SPEC = """
name: planted-moe
seed: 0
model:
  name: {model}
  device: cpu
dataset:
  name: python-docs
  max_passages: 4
  max_len: 16
steps:
  - id: moe
    analysis: moe_super_weights
    params: {{causal_scoring: true, router_analysis_samples: 4, batch_size: 2}}
expectations:
  - step: moe
    name: the planted weight is found
    that: "n_found == 1 and weights[0].expert == {expert} and weights[0].row == {row}"
  - step: moe
    name: the decoy is rejected by its co-spike
    that: "rejected.low_co_spike == 1 and router.p_active[0][{expert}] == 1"
  - step: moe
    name: restoring gives the baseline exactly
    that: "causal.restored_exact and causal.restored == causal.baseline"
"""


def test_planted_expert_weight_is_found_through_the_cli(
    olmoe_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from runner.cli import main

    spec = tmp_path / "moe.yaml"
    spec.write_text(textwrap.dedent(SPEC).format(model=olmoe_dir, expert=EXPERT, row=ROW).lstrip())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")
    code = main(["run", str(spec), "--output-dir", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "1 passed in" in out
    (folder,) = (tmp_path / "runs" / "planted-moe").iterdir()
    case = json.loads((folder / "manifest.json").read_text())["cases"]["moe"]
    assert [c["passed"] for c in case["checks"]] == [True, True, True]
    weights = (folder / "data/moe/super_weights.csv").read_text().splitlines()
    assert weights[1].startswith(f"0,{LAYER},{EXPERT},{ROW},{COL},")
    assert (folder / "plots/moe/moe_analysis.png").read_bytes()[:4] == b"\x89PNG"
    report = (folder / "report.md").read_text()
    assert "### Mixture-of-experts super weights of" in report and "**Causal scoring**" in report
