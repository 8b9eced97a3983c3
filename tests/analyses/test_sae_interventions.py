"""sae_interventions against independent computations on tiny models and tiny SAEs (hooks written here)."""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import ValidationError

import analyses.sae_interventions as si
from analyses.sae_interventions import compute
from analyses.sae_interventions.fast import cheapest_cuts
from runner.artifacts import RunFolder
from runner.datasets import TokenDataset
from runner.errors import ResourceError
from runner.models import LoadedModel, load_model
from runner.step import StepContext, StepOutput

BOS = 1  # the tiny tokenizer's <|bos|>
D_SAE = 24
FLOAT32_EPS = torch.finfo(torch.float32).eps
LOG_PROB_TOL = 32 * FLOAT32_EPS
"""How far two float32 computations of one Δloss, KL or logit change may differ (3.8e-6): 4 ulps at the
magnitude of these tiny models' log-probabilities (|log p| < 16: 9.0 at most; an ulp in [8, 16) is
8 eps). Each metric is a difference of two such numbers, and a mean over positions keeps the bound;
measured differences stay under 5e-7."""
TIE_ULPS = 64
"""Within this many float32 ulps (of the largest magnitude involved) a value is near a tie: a top-1
token or a feature's firing may then come out differently in two computations. Far above what two
computations of one value differ by here (a few ulps; a float32 dot product over these models'
32 dims rounds by at most 32 ulps of its terms)."""


def make_sae(loaded: LoadedModel, hook: str, seed: int) -> Any:
    """A random standard SAE calibrated on the model's activations at ``hook``: its features fire on
    40% down to 3% of positions, and each decoder direction is half an average activation long."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    d_in = loaded.model.cfg.d_model
    torch.manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=D_SAE, metadata=SAEMetadata(hook_name=hook)))
    with torch.no_grad():
        _, cache = loaded.model.run_with_cache(
            tokens_for(loaded, n=16, seed=100 + seed), padding_side="right"
        )
        acts = cache[hook][:, 1:].flatten(0, 1)  # (N, d_in), BOS left out
        sae.b_dec.zero_()
        sae.W_enc.normal_(0, 1 / d_in**0.5)
        pre = acts @ sae.W_enc  # (N, d_sae)
        quantiles = torch.linspace(0.6, 0.97, D_SAE)
        sae.b_enc.copy_(-torch.stack([pre[:, i].quantile(q) for i, q in enumerate(quantiles)]))
        directions = torch.nn.functional.normalize(torch.randn(D_SAE, d_in), dim=-1)
        sae.W_dec.copy_(directions * 0.5 * acts.norm(dim=-1).mean())
    return sae.eval()


@pytest.fixture(scope="module")
def llama(tiny_llama_dir: Path) -> LoadedModel:
    """The tiny Llama through runner's loader: rotary, grouped KV heads, RMSNorm."""
    return load_model(str(tiny_llama_dir))


HOOKS = [
    "blocks.0.hook_resid_post",
    "blocks.1.hook_resid_pre",
    "blocks.1.hook_mlp_out",
    "blocks.1.hook_resid_post",
]


@pytest.fixture(scope="module")
def sae_dir(tiny_model: LoadedModel, llama: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Calibrated SAEs, one directory per hook: for the tiny Llama at the top, for the tiny GPT-2 in gpt/."""
    root = tmp_path_factory.mktemp("saes")
    for seed, hook in enumerate(HOOKS):
        make_sae(llama, hook, seed).save_model(root / hook)
        make_sae(tiny_model, hook, seed).save_model(root / "gpt" / hook)
    return root


@pytest.fixture(scope="module")
def gpt_saes(sae_dir: Path) -> Path:
    """The SAEs of the tiny GPT-2-style model."""
    return sae_dir / "gpt"


def tokens_for(loaded: LoadedModel, n: int = 6, length: int = 12, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, loaded.model.cfg.d_vocab, (n, length), generator=generator)  # (n, T)
    tokens[:, 0] = BOS
    return tokens


def run(
    loaded: LoadedModel, sae_dir: Path, tokens: torch.Tensor, seed: int = 0, **params: Any
) -> tuple[StepOutput, StepContext]:
    dataset = TokenDataset("random", tokens, "x")
    ctx = StepContext.standalone(model=loaded, dataset=dataset, seed=seed, case_id="case", spec_dir=sae_dir)
    params.setdefault("batch_size", 4)
    params["sae"] = {"path": params.pop("path")}
    return si.sae_interventions(ctx, si.SaeInterventionsParams(**params)), ctx


def rows_of(output: StepOutput) -> list[dict[str, Any]]:
    return output.data["per_feature_metrics.jsonl"]


def row(output: StepOutput, layer: int, feature: int, alpha: float) -> dict[str, Any]:
    [found] = [
        r for r in rows_of(output) if (r["layer"], r["feature"], r["alpha"]) == (layer, feature, alpha)
    ]
    return found


def tie_margin(scale: torch.Tensor) -> float:
    """:data:`TIE_ULPS` float32 ulps of the largest ``|scale|``."""
    return TIE_ULPS * FLOAT32_EPS * float(scale.abs().max())


def near_ties(logits: torch.Tensor) -> torch.Tensor:
    """``(...)`` bool: positions whose top-1 token is within rounding of a tie with the second."""
    top = logits.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1] <= tie_margin(logits)


def independent(
    loaded: LoadedModel,
    sae: Any,
    hook: str,
    tokens: torch.Tensor,
    feature: int,
    alpha: float,
    mode: str = "scale",
) -> dict[str, Any]:
    """The metrics from two plain forward passes, the edit written directly as a hook.

    ``near_ties`` counts the predicting positions whose clean or edited top-1 token is within rounding
    of a tie: ``tokens_affected`` of another computation may differ by that many. No feature
    activation may be near 0 (or the clamp value), so that the firing positions are the same.
    """
    model = loaded.model
    keep = torch.ones(tokens.shape, dtype=torch.bool)
    keep[:, 0] = tokens[:, 0] != BOS

    def edit(act: torch.Tensor, hook: Any) -> torch.Tensor:
        f = sae.encode(act)[..., feature]
        new = {"scale": alpha * f, "ablate": torch.zeros_like(f), "clamp": torch.full_like(f, alpha)}[mode]
        return act + ((new - f) * keep).unsqueeze(-1) * sae.W_dec[feature]

    with torch.no_grad():
        clean, cache = model.run_with_cache(tokens, padding_side="right")
        edited = model.run_with_hooks(tokens, fwd_hooks=[(hook, edit)], padding_side="right")
        f = sae.encode(cache[hook])[..., feature] * keep  # (n, T)
        _, sae_cache = sae.run_with_cache(cache[hook], names_filter="hook_sae_acts_pre")
    pre = sae_cache["hook_sae_acts_pre"][..., feature][keep]  # fires where > 0
    assert float(pre.abs().min()) > tie_margin(pre), "a feature activation is within rounding of 0"
    if mode == "clamp":  # edited where f != alpha
        assert float((f[keep] - alpha).abs().min()) > tie_margin(f.max() + alpha), (
            "f within rounding of alpha"
        )
    logp, logq = clean[:, :-1].log_softmax(-1).double(), edited[:, :-1].log_softmax(-1).double()
    target = tokens[:, 1:].unsqueeze(-1)
    delta_ce = (logp.gather(-1, target) - logq.gather(-1, target)).squeeze(-1)  # (n, T-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    fires = f[:, :-1] > 0
    logit_delta = (edited - clean)[:, :-1].double()
    changed = {"scale": (alpha * f != f), "ablate": f != 0, "clamp": (f != alpha)}[mode] & keep
    return {
        "delta_loss": delta_ce.mean().item(),
        "kl": kl.mean().item(),
        "delta_loss_where_fires": (delta_ce[fires].mean().item() if fires.any() else None),
        "kl_where_fires": (kl[fires].mean().item() if fires.any() else None),
        "firing_fraction": ((f > 0).sum() / keep.sum()).item(),
        "passages_with_feature": int((f > 0).any(1).sum()),
        "tokens_intervened": int(changed.sum()),
        "tokens_affected": int((clean.argmax(-1) != edited.argmax(-1))[:, :-1].sum()),
        "near_ties": int((near_ties(clean[:, :-1]) | near_ties(edited[:, :-1])).sum()),
        "mean_logit_delta": logit_delta.mean((0, 1)),
        "logit_delta_where_fires": logit_delta[fires].mean(0) if fires.any() else None,
    }


def assert_matches(got: dict[str, Any], expected: dict[str, Any], tol: float = LOG_PROB_TOL) -> None:
    # The analysis runs other batch shapes (and, on the fast path, other kernels) than `independent`:
    # floats agree to rounding; counts exactly, but for top-1 tokens within rounding of a tie.
    for key in ("delta_loss", "kl", "delta_loss_where_fires", "kl_where_fires", "firing_fraction"):
        if expected[key] is None:
            assert got[key] is None, key
        else:
            assert got[key] == pytest.approx(expected[key], abs=tol), key
    for key in ("passages_with_feature", "tokens_intervened"):
        assert got[key] == expected[key], key
    assert abs(got["tokens_affected"] - expected["tokens_affected"]) <= expected["near_ties"]
    top = expected["mean_logit_delta"].topk(4)
    gaps = -top.values.diff()  # values more than 2 tol apart keep their order in `got`
    if gaps.min() > 2 * tol:
        assert [t["id"] for t in got["top_promoted"][:3]] == top.indices[:3].tolist()
    assert [t["logit_delta"] for t in got["top_promoted"][:3]] == pytest.approx(
        top.values[:3].tolist(), abs=tol
    )
    low = expected["mean_logit_delta"].topk(3, largest=False)
    assert [t["logit_delta"] for t in got["top_suppressed"][:3]] == pytest.approx(
        low.values.tolist(), abs=tol
    )
    if expected["logit_delta_where_fires"] is not None:
        fire_top = expected["logit_delta_where_fires"].topk(3)
        values = [t["logit_delta"] for t in got["top_promoted_where_fires"][:3]]
        assert values == pytest.approx(fire_top.values.tolist(), abs=tol)


def load_sae(sae_dir: Path, hook: str) -> Any:
    from sae_lens import SAE

    return SAE.load_from_disk(sae_dir / hook).eval()


# --- metrics against independent hooks -------------------------------------------------------------


@pytest.mark.parametrize("method", ["fast", "loop"])
def test_metrics_match_independent_hooks(tiny_model: LoadedModel, gpt_saes: Path, method: str) -> None:
    hook = "blocks.0.hook_resid_post"
    tokens = tokens_for(tiny_model)
    output, _ = run(
        tiny_model, gpt_saes, tokens, path=hook, features="0-5", method=method, alpha_sweep=[0, 2, 4]
    )
    sae = load_sae(gpt_saes, hook)
    for feature in range(6):
        for alpha in (0.0, 2.0, 4.0):
            assert_matches(
                row(output, 0, feature, alpha), independent(tiny_model, sae, hook, tokens, feature, alpha)
            )


def test_rotary_grouped_kv_model_matches_independent_hooks(llama: LoadedModel, sae_dir: Path) -> None:
    """The fast path's key-value prefix and start_at_layer on a rotary model with grouped KV heads."""
    hook = "blocks.1.hook_resid_pre"
    tokens = tokens_for(llama, n=5, length=16)
    output, _ = run(llama, sae_dir, tokens, path=hook, features="0-5", alpha_sweep=[0], alpha=3)
    assert output.result.rows["run"] > 0
    sae = load_sae(sae_dir, hook)
    for feature in range(6):
        for alpha in (0.0, 3.0):
            assert_matches(
                row(output, 1, feature, alpha), independent(llama, sae, hook, tokens, feature, alpha)
            )


def test_soft_capped_logits_match_independent_hooks(tiny_model: LoadedModel, gpt_saes: Path) -> None:
    """Soft-capped logits (Gemma 2) are not affine in the residual: compared over the vocabulary."""
    capped = copy.deepcopy(tiny_model)
    capped.model.cfg.output_logits_soft_cap = 0.5
    hook = "blocks.0.hook_resid_post"
    tokens = tokens_for(capped)
    output, _ = run(capped, gpt_saes, tokens, path=hook, features="0-3", alpha_sweep=[0], alpha=3)
    sae = load_sae(gpt_saes, hook)
    for feature in range(4):
        for alpha in (0.0, 3.0):
            assert_matches(
                row(output, 0, feature, alpha), independent(capped, sae, hook, tokens, feature, alpha)
            )


def test_a_model_the_lean_forward_does_not_cover_runs_on_transformer_lens_blocks(
    tiny_model: LoadedModel, gpt_saes: Path
) -> None:
    """Soft-capped attention scores (Gemma 2) are outside the lean forward: the fast path says so and
    runs TransformerLens' own blocks, with the same numbers."""
    capped = copy.deepcopy(tiny_model)
    capped.model.cfg.attn_scores_soft_cap = 0.5
    hook = "blocks.0.hook_resid_post"
    tokens = tokens_for(capped)
    output, ctx = run(capped, gpt_saes, tokens, path=hook, features="0-3", alpha_sweep=[0], alpha=3)
    assert any("TransformerLens' own blocks" in note and "attn_scores_soft_cap" in note for note in ctx.notes)
    assert output.result.forward == "transformer_lens"
    sae = load_sae(gpt_saes, hook)
    for feature in range(4):
        assert_matches(row(output, 0, feature, 3.0), independent(capped, sae, hook, tokens, feature, 3.0))


@pytest.mark.parametrize("mode", ["clamp", "ablate"])
def test_clamp_and_ablate_match_independent_hooks(llama: LoadedModel, sae_dir: Path, mode: str) -> None:
    hook = "blocks.1.hook_resid_pre"
    tokens = tokens_for(llama, n=4, length=10)
    output, _ = run(llama, sae_dir, tokens, path=hook, features=[2, 5], mode=mode, alpha_sweep=[0.5], alpha=3)
    sae = load_sae(sae_dir, hook)
    alphas = [0.0] if mode == "ablate" else [0.5, 3.0]
    assert sorted({r["alpha"] for r in rows_of(output)}) == alphas
    for feature in (2, 5):
        for alpha in alphas:
            got = row(output, 1, feature, alpha)
            assert_matches(got, independent(llama, sae, hook, tokens, feature, alpha, mode))


def test_a_site_inside_the_block_matches_independent_hooks(llama: LoadedModel, sae_dir: Path) -> None:
    hook = "blocks.1.hook_mlp_out"
    tokens = tokens_for(llama, n=4, length=10)
    output, _ = run(llama, sae_dir, tokens, path=hook, features=[0, 3, 7], alpha_sweep=[0, 2])
    sae = load_sae(sae_dir, hook)
    for feature in (0, 3, 7):
        assert_matches(row(output, 1, feature, 2.0), independent(llama, sae, hook, tokens, feature, 2.0))


@pytest.mark.parametrize("forward", ["lean", "transformer_lens"])
def test_fast_path_equals_loop_on_every_metric_over_several_layers(
    llama: LoadedModel, sae_dir: Path, forward: str
) -> None:
    tokens = tokens_for(llama, n=7, length=14, seed=3)
    common = {
        "path": "blocks.{layer}.hook_resid_post",
        "layers": "0-1",
        "features": "0-5",
        "alpha_sweep": [0],
        "alpha": 3,
    }
    fast, ctx = run(llama, sae_dir, tokens, method="fast", forward=forward, batch_size=3, **common)
    assert not [note for note in ctx.notes if "TransformerLens' own blocks" in note]
    assert fast.result.forward == forward
    loop, _ = run(llama, sae_dir, tokens, method="loop", batch_size=3, **common)
    # The two methods run different kernels on the rows: floats agree to float32 rounding, counts
    # exactly (one clean pass counts the firing positions) but for top-1 tokens near a tie.
    n_predicting = tokens.numel() - len(tokens)
    for a, b in zip(rows_of(fast), rows_of(loop), strict=True):
        sae = load_sae(sae_dir, a["hook"])
        ties = independent(llama, sae, a["hook"], tokens, a["feature"], a["alpha"])["near_ties"]
        assert abs(a["tokens_affected"] - b["tokens_affected"]) <= ties
        assert a["fraction_affected"] == pytest.approx(b["fraction_affected"], abs=ties / n_predicting)
        for key, value in a.items():
            if key in ("tokens_affected", "fraction_affected"):
                continue
            if isinstance(value, float):
                assert value == pytest.approx(b[key], abs=LOG_PROB_TOL), key
            elif isinstance(value, list):
                assert [t["logit_delta"] for t in value] == pytest.approx(
                    [t["logit_delta"] for t in b[key]], abs=LOG_PROB_TOL
                )
            else:
                assert value == b[key], key


# --- exactness: what an intervention leaves unchanged adds exactly 0 -------------------------------


@pytest.mark.parametrize("method", ["fast", "loop"])
def test_alpha_one_gives_exactly_zero_deltas(tiny_model: LoadedModel, gpt_saes: Path, method: str) -> None:
    # Batches of 4 and 1 passages: the loop unembeds 11 positions of the last batch, where a matmul on
    # 12 rows rounds differently (MKL with 2 threads on AMD), so unembedding all 12 would not be exact.
    tokens = tokens_for(tiny_model, n=5)
    output, _ = run(
        tiny_model, gpt_saes, tokens, path="blocks.0.hook_resid_post", features="0-9", method=method
    )
    ones = [r for r in rows_of(output) if r["alpha"] == 1.0]
    assert len(ones) == 10
    if method == "fast":
        assert output.data["timing.json"]["rows_identity"] == 10 * 5
    # Exact by construction. The fast path skips these rows, so nothing is ever added to their zero sums.
    # The loop runs them: its hook adds an exact 0 and the intervened pass is the clean pass's computation
    # (the same blocks on the same batch, then the same unembedding of the same T-1 positions), so its
    # logits are the clean logits bit for bit and every difference is exactly 0.
    for r in ones:
        assert (r["delta_loss"], r["kl"], r["tokens_affected"], r["tokens_intervened"]) == (0.0, 0.0, 0, 0)
        assert all(t["logit_delta"] == 0.0 for t in r["top_promoted"] + r["top_suppressed"])
    assert output.result.identity_max_abs == 0.0


@pytest.mark.parametrize("method", ["fast", "loop"])
def test_positions_before_the_first_edit_add_exactly_zero(
    llama: LoadedModel, sae_dir: Path, method: str
) -> None:
    """A causal model's positions before a passage's first edited one are unchanged, so their KL is
    exactly 0 and no snippet (a position of largest KL > 0) points there."""
    hook = "blocks.1.hook_resid_pre"
    tokens = tokens_for(llama, n=8, length=12, seed=5)
    # One batch: the fast path packs rows with different first edits into one pass, which recomputes a
    # row's positions from the pass's first edit on; it takes those before the row's own as the clean run.
    # The loop computes them as the clean pass does (the same computation), so bit for bit.
    output, _ = run(
        llama,
        sae_dir,
        tokens,
        path=hook,
        features="0-5",
        alpha_sweep=[0],
        alpha=3,
        method=method,
        batch_size=8,
        snippets_per_intervention=1000,
    )
    sae = load_sae(sae_dir, hook)
    with torch.no_grad():
        _, cache = llama.model.run_with_cache(tokens, padding_side="right")
        _, sae_cache = sae.run_with_cache(cache[hook], names_filter="hook_sae_acts_pre")
    pre = sae_cache["hook_sae_acts_pre"][:, 1:, :6]  # BOS excluded
    assert float(pre.abs().min()) > tie_margin(pre), "a feature activation is within rounding of 0"
    fires = sae.encode(cache[hook])[..., :6] > 0  # (n, T, 6)
    fires[:, 0] = False  # BOS is never edited
    first = torch.where(fires.any(1), fires.to(torch.int8).argmax(1), len(tokens[0]))  # (n, 6)
    snippets = output.data["snippets.jsonl"]
    assert snippets
    assert [s for s in snippets if s["position"] < first[s["passage"], s["feature"]]] == []


def test_passages_where_the_feature_never_fires_add_exactly_zero(llama: LoadedModel, sae_dir: Path) -> None:
    hook = "blocks.1.hook_resid_pre"
    tokens = tokens_for(llama, n=8, length=12, seed=5)
    sae = load_sae(sae_dir, hook)
    with torch.no_grad():
        _, cache = llama.model.run_with_cache(tokens, padding_side="right")
        fires = (sae.encode(cache[hook])[:, 1:] > 0).any(1)  # (n, d_sae): passage x feature, BOS excluded
    partial = [f for f in range(D_SAE) if 0 < int(fires[:, f].sum()) < len(tokens)]
    assert partial, "the tiny SAE should have features that fire in some passages only"
    feature = partial[0]
    silent, firing = tokens[~fires[:, feature]], tokens[fires[:, feature]]
    independent(llama, sae, hook, tokens, feature, 4.0)  # asserts no activation is within rounding of 0
    # The loop runs the silent passages with a hook that adds an exact 0, and the intervened pass is the
    # clean pass's computation (see test_alpha_one_gives_exactly_zero_deltas): exactly the clean output.
    # One passage per batch: 11 positions unembedded, where 12 would round differently.
    loop, _ = run(
        llama,
        sae_dir,
        silent,
        path=hook,
        features=[feature],
        method="loop",
        alpha_sweep=[0],
        alpha=4,
        batch_size=1,
    )
    assert [(r["delta_loss"], r["kl"], r["tokens_affected"]) for r in rows_of(loop)] == [(0.0, 0.0, 0)] * 2
    # The fast path skips them (`rows.not_firing`): they add exactly 0, yet their tokens count in every
    # mean. One passage per batch makes the firing passages' passes and float64 sums (in the same order)
    # the same computation in both runs: only the final division differs, by float64 rounding.
    common: dict[str, Any] = {
        "path": hook,
        "features": [feature],
        "alpha_sweep": [0],
        "alpha": 4,
        "batch_size": 1,
    }
    full, _ = run(llama, sae_dir, tokens, **common)
    only, _ = run(llama, sae_dir, firing, **common)
    assert full.result.rows["not_firing"] == 2 * len(silent)
    for a, b in zip(rows_of(full), rows_of(only), strict=True):
        assert a["delta_loss"] * len(tokens) == pytest.approx(b["delta_loss"] * len(firing), rel=1e-14)
        assert a["kl"] * len(tokens) == pytest.approx(b["kl"] * len(firing), rel=1e-14)
        assert a["tokens_affected"] == b["tokens_affected"]


def test_fast_path_runs_fewer_tokens_than_the_loop(llama: LoadedModel, sae_dir: Path) -> None:
    tokens = tokens_for(llama, n=6, length=16)
    fast, _ = run(llama, sae_dir, tokens, path="blocks.1.hook_resid_pre", features="0-5")
    loop, _ = run(llama, sae_dir, tokens, path="blocks.1.hook_resid_pre", features="0-5", method="loop")
    work_fast, work_loop = fast.data["timing.json"], loop.data["timing.json"]
    assert work_fast["block_token_layers"] < work_loop["block_token_layers"] / 2
    assert work_fast["rows_identity"] == 6 * 6  # alpha 1 for every passage and feature
    assert work_loop["forward_passes"] == 6 * 5 * 2  # (feature, alpha) per batch of 4 passages


# --- feature selection ----------------------------------------------------------------------------


def counts_of(
    loaded: LoadedModel, sae: Any, hook: str, tokens: torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        _, cache = loaded.model.run_with_cache(tokens, padding_side="right")
        f = sae.encode(cache[hook])[:, 1:]  # BOS excluded
    return (f > 0).sum((0, 1)).numpy(), f.mean((0, 1)).double().numpy()


def test_top_frequency_picks_the_most_often_firing_features(tiny_model: LoadedModel, gpt_saes: Path) -> None:
    hook = "blocks.0.hook_resid_post"
    tokens = tokens_for(tiny_model)
    output, _ = run(
        tiny_model, gpt_saes, tokens, path=hook, feature_source="top_frequency", features_per_layer=4
    )
    counts, _ = counts_of(tiny_model, load_sae(gpt_saes, hook), hook, tokens)
    expected = sorted(range(D_SAE), key=lambda f: (-counts[f], f))[:4]
    assert output.result.layers[0].features == expected


def test_live_features_are_at_or_above_the_percentile(tiny_model: LoadedModel, gpt_saes: Path) -> None:
    hook = "blocks.0.hook_resid_post"
    tokens = tokens_for(tiny_model)
    output, _ = run(tiny_model, gpt_saes, tokens, path=hook, live_percentile=75, features_per_layer=3)
    counts, means = counts_of(tiny_model, load_sae(gpt_saes, hook), hook, tokens)
    threshold = np.percentile(means[counts > 0], 75)
    chosen = output.result.layers[0].features
    assert len(chosen) == 3 and all(means[f] >= threshold - 1e-7 for f in chosen)


def test_random_features_follow_the_seed(tiny_model: LoadedModel, gpt_saes: Path) -> None:
    tokens = tokens_for(tiny_model)
    picks = []
    for seed in (0, 0, 1):
        output, _ = run(
            tiny_model,
            gpt_saes,
            tokens,
            seed=seed,
            path="blocks.0.hook_resid_post",
            feature_source="random",
            alpha_sweep=[2],
        )
        picks.append(output.result.layers[0].features)
    assert picks[0] == picks[1] != picks[2]


def test_features_per_layer_from_a_dict(llama: LoadedModel, sae_dir: Path) -> None:
    output, _ = run(
        llama,
        sae_dir,
        tokens_for(llama),
        path="blocks.{layer}.hook_resid_post",
        layers="0-1",
        features={0: "1-2", 1: [4]},
        alpha_sweep=[2],
    )
    assert [output.result.layers[layer].features for layer in (0, 1)] == [[1, 2], [4]]


def test_features_from_a_csv_in_the_seed_format_keep_their_labels(
    tiny_model: LoadedModel, gpt_saes: Path
) -> None:
    (gpt_saes / "features.csv").write_text("layer,feature,label\n0,3,dots\n0,7,\n1,2,other layer\n")
    output, _ = run(
        tiny_model,
        gpt_saes,
        tokens_for(tiny_model),
        path="blocks.0.hook_resid_post",
        features_csv="features.csv",
        alpha_sweep=[2],
    )
    assert [(r["feature"], r["label"]) for r in rows_of(output)] == [(3, "dots"), (7, "")]


def test_missing_csv_says_how_to_write_one(tiny_model: LoadedModel, gpt_saes: Path) -> None:
    with pytest.raises(ResourceError, match="header `layer,feature,label`"):
        run(
            tiny_model,
            gpt_saes,
            tokens_for(tiny_model),
            path="blocks.0.hook_resid_post",
            features_csv="nope.csv",
        )


def test_feature_beyond_the_sae_names_its_size(tiny_model: LoadedModel, gpt_saes: Path) -> None:
    with pytest.raises(
        ResourceError, match=r"features \[30\] \(`features`\) do not exist .* has 24 features \(0-23\)"
    ):
        run(tiny_model, gpt_saes, tokens_for(tiny_model), path="blocks.0.hook_resid_post", features=[1, 30])


# --- CUDA out-of-memory -----------------------------------------------------------------------------


def test_cuda_out_of_memory_halves_the_batch_and_retries(
    llama: LoadedModel, sae_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokens = tokens_for(llama, n=6)
    expected, _ = run(llama, sae_dir, tokens, path="blocks.1.hook_resid_pre", features=[0, 1], batch_size=2)
    original, attempts = compute.clean_batch, []

    def clean_batch(model: Any, batch: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        attempts.append(len(batch))
        if len(batch) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(model, batch, *args, **kwargs)

    monkeypatch.setattr(compute, "clean_batch", clean_batch)
    output, ctx = run(llama, sae_dir, tokens, path="blocks.1.hook_resid_pre", features=[0, 1], batch_size=8)
    assert attempts[:2] == [6, 4] and attempts[2:] == [2, 2, 2]
    assert "CUDA out of memory: retried the case with batch_size 4." in ctx.notes
    assert "CUDA out of memory: retried the case with batch_size 2." in ctx.notes
    assert output.data["timing.json"]["batch_size"] == 2
    # The retry starts the case over at batch_size 2: the same batches and passes as `expected`.
    assert rows_of(output) == rows_of(expected)


def test_out_of_memory_at_batch_size_one_is_a_clear_error(
    tiny_model: LoadedModel, gpt_saes: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def always(*args: Any, **kwargs: Any) -> Any:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(compute, "clean_batch", always)
    with pytest.raises(Exception, match="ran out of memory even with batch_size 1"):
        run(
            tiny_model,
            gpt_saes,
            tokens_for(tiny_model),
            path="blocks.0.hook_resid_post",
            features=[0],
            batch_size=2,
        )


# --- outputs and report -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tiny_model: LoadedModel, gpt_saes: Path) -> tuple[StepOutput, StepContext]:
    return run(
        tiny_model,
        gpt_saes,
        tokens_for(tiny_model),
        path="blocks.{layer}.hook_resid_post",
        layers="0-1",
        features="0-3",
        snippets_per_intervention=2,
    )


def test_data_files_carry_the_seed_names(finished: tuple[StepOutput, StepContext], tmp_path: Path) -> None:
    output, _ = finished
    written = RunFolder(tmp_path).write_data("case", output.data)
    names = {Path(p).name for p in written}
    assert {
        "per_feature_metrics.csv",
        "per_layer_summary.csv",
        "per_feature_metrics.jsonl",
        "snippets.jsonl",
    } <= names
    table = pd.read_csv(tmp_path / "data" / "case" / "per_feature_metrics.csv")
    assert len(table) == 2 * 4 * 5  # layers x features x alphas
    assert list(table.columns[:7]) == ["layer", "hook", "sae_hook", "feature", "label", "mode", "alpha"]
    layers = pd.read_csv(tmp_path / "data" / "case" / "per_layer_summary.csv")
    at_two = layers[(layers.layer == 1) & (layers.alpha == 2.0)].iloc[0]
    assert at_two.mean_delta_loss == pytest.approx(
        table[(table.layer == 1) & (table.alpha == 2.0)].delta_loss.mean()
    )


def test_plots_are_named_like_the_seed(finished: tuple[StepOutput, StepContext], tmp_path: Path) -> None:
    written = RunFolder(tmp_path).write_plots("case", finished[0].plots)
    assert {Path(p).name for p in written} == {
        "layer_vs_dloss_alpha2.png",
        "alpha_response_dloss.png",
        "alpha_response_kl.png",
    }


def test_snippets_hold_the_largest_kl_positions(finished: tuple[StepOutput, StepContext]) -> None:
    snippets = finished[0].data["snippets.jsonl"]
    first = [s for s in snippets if (s["layer"], s["feature"], s["alpha"]) == (0, 0, 4.0)]
    assert len(first) == 2 and first[0]["kl"] >= first[1]["kl"] > 0
    assert first[0]["context"].endswith(first[0]["context"][-1:]) and first[0]["next_token"]
    assert "# Largest changes in prediction (scale, alpha 2)" in finished[0].data["snippets.md"]


def test_summary_names_hooks_and_the_strongest_effect(finished: tuple[StepOutput, StepContext]) -> None:
    result = finished[0].result
    assert result.layers[0].hook == "blocks.0.hook_resid_post"
    assert len(result.layers[1].delta_loss_by_alpha) == len(result.alphas) == 5
    at_two = [r for r in rows_of(finished[0]) if r["alpha"] == 2.0]
    # The summary picks the row: the same number, not a recomputation.
    assert abs(result.top_effect["delta_loss"]) == max(abs(r["delta_loss"]) for r in at_two)


@pytest.mark.parametrize("template", ["sae_interventions.md.j2", "sae_interventions.html.j2"])
def test_report_partials_render(
    finished: tuple[StepOutput, StepContext], render_partial: Callable[..., str], template: str
) -> None:
    text = render_partial(finished[0], template, step_id="interventions")
    assert "SAE feature interventions" in text and "blocks.1.hook_resid_post" in text
    assert "layer_vs_dloss_alpha2" in text
    assert "alpha = 1 is exactly the clean model" in text
    assert "method `fast` on lean blocks" in text or "method <code>fast</code> on lean blocks" in text


# --- params ---------------------------------------------------------------------------------------


def test_params_read_the_seed_alpha_sweep_syntax() -> None:
    params = si.SaeInterventionsParams(sae={"path": "x"}, alpha_sweep="0,0.5,1,2,4", alpha=3)
    assert params.alphas() == (0.0, 0.5, 1.0, 2.0, 4.0, 3.0)


def test_params_infer_the_feature_source() -> None:
    assert si.SaeInterventionsParams(sae={"path": "x"}).chosen_source == "live"
    assert si.SaeInterventionsParams(sae={"path": "x"}, features=[1]).chosen_source == "explicit"
    assert si.SaeInterventionsParams(sae={"path": "x"}, features_csv="f.csv").chosen_source == "csv"


def test_params_refuse_features_that_would_be_ignored() -> None:
    with pytest.raises(
        ValidationError, match="`features` is only read with feature_source `explicit`, not `random`"
    ):
        si.SaeInterventionsParams(sae={"path": "x"}, features=[1], feature_source="random")


def test_params_need_an_sae() -> None:
    with pytest.raises(ValidationError, match="sae"):
        si.SaeInterventionsParams()  # type: ignore[call-arg]


def _split_cost(cuts: tuple[int, ...], span: np.ndarray, budget: int, overhead: int) -> float:
    """The chunker's objective, priced independently: overhead + padded tokens per pass."""
    total = 0.0
    for a, b in itertools.pairwise(cuts):
        if (b - a) * span[a] > budget and b - a > 1:
            return math.inf
        total += overhead + (b - a) * span[a]
    return total


def test_chunker_finds_the_cheapest_split_of_rows() -> None:
    # Against every way to cut 7 rows into consecutive passes.
    rng = np.random.default_rng(0)
    every = [(0, *inner, 7) for k in range(7) for inner in itertools.combinations(range(1, 7), k)]
    for _ in range(20):
        span = np.sort(rng.integers(1, 128, size=7))[::-1]  # rows sorted by t0: spans non-increasing
        budget = int(rng.integers(128, 600))
        overhead = int(rng.integers(0, 300))
        found = _split_cost(tuple(cheapest_cuts(span, budget, overhead)), span, budget, overhead)
        assert found == min(_split_cost(c, span, budget, overhead) for c in every)  # integer costs: exact
