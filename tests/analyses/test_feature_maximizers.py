"""feature_maximizers on a tiny model with a planted feature whose maximizer is known exactly."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

import analyses.feature_maximizers as fm
from runner.datasets import TokenDataset
from runner.errors import ResourceError
from runner.models import LoadedModel
from runner.reports import fmt
from runner.step import StepContext, StepOutput

BOS = 1  # the tiny tokenizer's <|bos|>
SPECIAL = (0, 1, 2)
HOOK = "blocks.0.hook_resid_pre"
SEQ_LEN = 4
SHIPPED = {"name": "smollm2-135m/blocks.12.hook_resid_post"}


def planted_token(loaded: LoadedModel) -> int:
    """The ordinary token with the longest embedding: with the encoder row along its embedding,
    ``W_E[t] . w = |W_E[t]| >= |W_E[v]| >= W_E[v] . w`` for every other token v."""
    norms = loaded.model.W_E.detach().norm(dim=-1).clone()
    norms[list(SPECIAL)] = -1
    return int(norms.argmax())


@pytest.fixture(scope="module")
def target(tiny_model: LoadedModel) -> int:
    return planted_token(tiny_model)


@pytest.fixture(scope="module")
def sae_dir(tiny_model: LoadedModel, target: int, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-feature standard SAE on the embedding stream; feature 0 reads the target's embedding direction."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    d_in = tiny_model.model.cfg.d_model
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=3, metadata=SAEMetadata(hook_name=HOOK)))
    direction = tiny_model.model.W_E.detach()[target]
    with torch.no_grad():
        sae.b_dec.zero_()
        sae.b_enc.zero_()
        sae.W_enc.copy_(torch.randn(d_in, 3, generator=torch.Generator().manual_seed(1)) / d_in**0.5)
        sae.W_enc[:, 0] = direction / direction.norm()
    directory = tmp_path_factory.mktemp("planted_sae")
    sae.eval().save_model(directory)
    return directory


@pytest.fixture(scope="module")
def tokens(target: int) -> torch.Tensor:
    """Random passages that never hold the target token, so the dataset cannot reach the optimum."""
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(3, 320, (6, 12), generator=generator)  # (n, T)
    tokens[tokens == target] = 3 if target != 3 else 4
    tokens[:, 0] = BOS
    return tokens


def run(loaded: LoadedModel, tokens: torch.Tensor, spec_dir: Path, **params: Any) -> StepOutput:
    ctx = StepContext.standalone(
        model=loaded, dataset=TokenDataset("random", tokens, "x"), seed=0, spec_dir=spec_dir
    )
    params.setdefault("sae", {"path": "."})
    params.setdefault("seq_len", SEQ_LEN)
    return fm.feature_maximizers(ctx, fm.FeatureMaximizersParams(**params))


@pytest.fixture(scope="module")
def output(tiny_model: LoadedModel, tokens: torch.Tensor, sae_dir: Path) -> StepOutput:
    return run(
        tiny_model, tokens, sae_dir, features="0", n_steps=60, learning_rate=0.5,
        iterations=8, population=4, candidates=16, top_k=8,
    )  # fmt: skip


def found(output: StepOutput, method: str) -> fm.Maximizer:
    result = output.result
    assert isinstance(result, fm.FeatureMaximizersResult)
    (one,) = [m for m in result.maximizers if m.method == method]
    return one


def position_optima(loaded: LoadedModel, target: int) -> torch.Tensor:
    """``(SEQ_LEN,)`` the largest activation any token can reach at each position after BOS: at
    ``resid_pre`` of layer 0 a position's stream is its token's embedding plus its position's, so the
    target token there, whatever comes before. The relaxed method maximises the last position, the
    discrete search the largest over positions."""
    w_e, w_pos = loaded.model.W_E.detach(), loaded.model.W_pos.detach()
    return (w_e[target] + w_pos[1 : SEQ_LEN + 1]) @ (w_e[target] / w_e[target].norm())


@pytest.mark.parametrize("method", ["discrete", "embedding"])
def test_both_methods_find_the_planted_token(
    output: StepOutput, tiny_model: LoadedModel, target: int, method: str
) -> None:
    one = found(output, method)
    assert one.token_ids[0] == BOS and len(one.token_ids) == SEQ_LEN + 1
    optima = position_optima(tiny_model, target)
    position = SEQ_LEN if method == "embedding" else int(optima.argmax()) + 1
    assert one.token_ids[position] == target, (one.token_ids, target, optima)
    # the same dot product with another order of summation: float32 rounding, not bit-equal
    assert one.values[position] == pytest.approx(float(optima[position - 1]), rel=1e-5)
    assert one.activation == max(one.values)
    assert one.beats_dataset and one.activation > one.dataset_max


def test_relaxed_activation_is_reported_for_the_embedding_method(output: StepOutput) -> None:
    one = found(output, "embedding")
    # a mixture of embeddings reaches at most the best token's activation (the objective is linear)
    assert one.relaxed_activation is not None and 0 < one.relaxed_activation <= one.values[-1] * (1 + 1e-5)
    assert found(output, "discrete").relaxed_activation is None


def test_dataset_max_and_cross_entropy_match_brute_force(
    output: StepOutput, tiny_model: LoadedModel, tokens: torch.Tensor, target: int
) -> None:
    model = tiny_model.model
    w = model.W_E.detach()[target] / model.W_E.detach()[target].norm()
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, padding_side="right")
        acts = (cache[HOOK] @ w).clamp(min=0)  # (n, T)
    acts[torch.isin(tokens, torch.tensor(SPECIAL))] = 0
    one = found(output, "discrete")
    assert one.dataset_max == pytest.approx(float(acts.max()), rel=1e-5)
    sequence = torch.tensor([one.token_ids])
    with torch.no_grad():
        logits = model(sequence)
    ce = torch.nn.functional.cross_entropy(logits[0, :-1], sequence[0, 1:])
    assert one.cross_entropy == pytest.approx(float(ce), rel=1e-4)


def test_writes_maximizers_jsonl_and_figures(output: StepOutput) -> None:
    lines = [json.loads(line) for line in output.data["maximizers.jsonl"].splitlines()]
    assert [(d["feature"], d["method"]) for d in lines] == [(0, "embedding"), (0, "discrete")]
    assert set(output.plots) == {"feature_0_synthetic.png"}
    assert output.result.beats == {"embedding": 1, "discrete": 1}  # type: ignore[attr-defined]


def test_report_partials_render(output: StepOutput, render_partial: Callable[..., str]) -> None:
    markdown = render_partial(output, "feature_maximizers.md.j2")
    one = found(output, "discrete")
    assert one.start_activation is not None and one.swaps is not None
    row = f"| 0 |  | discrete | dataset | {fmt(one.start_activation)} | {one.swaps} | {fmt(one.activation)} |"
    assert row in markdown and "discrete 1 of 1" in markdown and "`init: dataset`" in markdown
    html = render_partial(output, "feature_maximizers.html.j2")
    assert "<td>discrete</td><td>dataset</td>" in html and "feature_0_synthetic" in html


def test_features_are_required() -> None:
    with pytest.raises(ValidationError, match="name the features to maximise"):
        fm.FeatureMaximizersParams(sae=SHIPPED)


def test_empty_methods_are_refused() -> None:
    with pytest.raises(ValidationError, match="`methods` is empty"):
        fm.FeatureMaximizersParams(sae=SHIPPED, features="0", methods=[])


def test_feature_beyond_the_sae_names_its_size(
    tiny_model: LoadedModel, tokens: torch.Tensor, sae_dir: Path
) -> None:
    with pytest.raises(ResourceError, match=r"features \[7\] do not exist .* which has 3 features \(0-2\)"):
        run(tiny_model, tokens, sae_dir, features="0,7", iterations=1, n_steps=1)


def test_from_step_must_have_analysed_the_features(
    tiny_model: LoadedModel, tokens: torch.Tensor, sae_dir: Path
) -> None:
    from runner.errors import RunnerError

    with pytest.raises(RunnerError, match="real"):
        run(tiny_model, tokens, sae_dir, features="0", from_step="real", iterations=1, n_steps=1)


# --- where the discrete search starts, what it reports, and how it scores ---------------------------


def sae_by_hand(sae_dir: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """The planted standard SAE's encoder computed from its saved weights: relu((x - b_dec) W_enc + b_enc)."""
    from safetensors.torch import load_file

    weights = load_file(str(sae_dir / "sae_weights.safetensors"))
    return lambda x: ((x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]).clamp(min=0)


def brute_force_acts(loaded: LoadedModel, tokens: torch.Tensor, sae_dir: Path) -> torch.Tensor:
    """``(n, T, 3)`` every feature's activation at every position, special tokens set to 0."""
    with torch.no_grad():
        _, cache = loaded.model.run_with_cache(tokens, padding_side="right")
        acts = sae_by_hand(sae_dir)(cache[HOOK])
    acts[torch.isin(tokens, torch.tensor(SPECIAL))] = 0
    return acts


def context(loaded: LoadedModel, tokens: torch.Tensor, sae_dir: Path) -> StepContext:
    dataset = TokenDataset("random", tokens, "fp-random")
    return StepContext.standalone(model=loaded, dataset=dataset, seed=0, spec_dir=sae_dir)


def search_for(loaded: LoadedModel, tokens: torch.Tensor, sae_dir: Path) -> Any:
    from analyses.feature_maximizers.compute import _search
    from runner.saes import SAESource

    ctx = context(loaded, tokens, sae_dir)
    (sae,) = ctx.saes(SAESource(path="."), layers=None, site=None, where="test")
    return _search(ctx, sae, "test")


def test_dataset_top_matches_a_brute_force_ranking(
    tiny_model: LoadedModel, tokens: torch.Tensor, sae_dir: Path
) -> None:
    from analyses.feature_maximizers.compute import dataset_top

    ctx = context(tiny_model, tokens, sae_dir)
    (sae,) = ctx.saes(fm.SAESource(path="."), layers=None, site=None, where="test")
    values, where = dataset_top(ctx, sae, [0, 1, 2], batch_size=4, k=5)
    acts = brute_force_acts(tiny_model, tokens, sae_dir).flatten(0, 1).T  # (3, n T)
    expected = acts.topk(5, dim=1)
    # another batch size and summation order than the brute force: float32 rounding, rel 1e-5
    torch.testing.assert_close(values, expected.values, rtol=1e-5, atol=1e-6)
    fired = expected.values > 0
    assert torch.equal(where[fired], expected.indices[fired]) and bool((where[~fired] == -1).all())


def test_dataset_windows_are_the_tokens_ending_at_each_top_position(
    tiny_model: LoadedModel, tokens: torch.Tensor, sae_dir: Path
) -> None:
    from analyses.feature_maximizers.compute import dataset_windows

    search = search_for(tiny_model, tokens, sae_dir)
    passages = tokens.clone()
    passages[2, 6] = 2  # a special token inside a window: never a token a search may hold
    length = passages.shape[1]
    top = [2 * length + 9, 4 * length + 2]  # passage 2 position 9; passage 4 position 2 (near its start)
    windows = dataset_windows(search, passages, top, SEQ_LEN, torch.Generator().manual_seed(0))
    assert windows.shape == (2, SEQ_LEN)
    assert windows[0, 1:].tolist() == passages[2, 7:10].tolist()  # positions 6..9, the special one redrawn
    assert windows[1, 2:].tolist() == passages[4, 1:3].tolist()  # positions 1..2 after BOS, 2 drawn
    drawn = torch.stack([windows[0, 0], windows[1, 0], windows[1, 1]])
    assert bool(torch.isin(drawn, search.pool).all()) and not bool(
        torch.isin(drawn, torch.tensor(SPECIAL)).any()
    )


@pytest.fixture(scope="module")
def unplanted(tiny_model: LoadedModel, tokens: torch.Tensor, sae_dir: Path) -> StepOutput:
    """Features 1 and 2 (random encoder rows): dataset starts for one run, random for the other."""
    return run(
        tiny_model, tokens, sae_dir, features="1,2", methods=["discrete"], iterations=6,
        population=3, candidates=8, top_k=8, restarts=2, init="mixed",
    )  # fmt: skip


def test_dataset_starts_are_the_windows_of_the_top_activations(
    unplanted: StepOutput, tiny_model: LoadedModel, tokens: torch.Tensor, sae_dir: Path
) -> None:
    acts = brute_force_acts(tiny_model, tokens, sae_dir)
    length = tokens.shape[1]
    seeded = [m for m in unplanted.result.maximizers if m.init == "dataset"]  # type: ignore[attr-defined]
    assert seeded, "with restarts: 2 and init: mixed, a dataset start should win for some feature"
    for one in seeded:
        assert one.start_token_ids is not None and one.start_token_ids[0] == BOS
        top = acts[..., one.feature].flatten().topk(3).indices.tolist()  # the first restart's windows
        tails = []
        for index in top:
            passage, position = divmod(index, length)
            window = tokens[passage, max(1, position - SEQ_LEN + 1) : position + 1].tolist()
            tails.append(window)
        assert any(one.start_token_ids[-len(w) :] == w for w in tails), (one.start_token_ids, tails)


def test_the_search_never_ends_below_its_start(unplanted: StepOutput) -> None:
    for one in unplanted.result.maximizers:  # type: ignore[attr-defined]
        assert one.trace is not None and len(one.trace) == 6 + 1
        assert all(b >= a for a, b in zip(one.trace, one.trace[1:], strict=False)), one.trace
        assert one.start_activation is not None and one.swaps is not None
        # start and end scored by the same function on other tokens: float32 rounding at most
        assert one.activation >= one.start_activation * (1 - 1e-5)
        assert one.swaps <= SEQ_LEN


def test_reported_activations_equal_an_independent_forward(
    unplanted: StepOutput, output: StepOutput, tiny_model: LoadedModel, sae_dir: Path
) -> None:
    encode = sae_by_hand(sae_dir)
    for one in [*unplanted.result.maximizers, *output.result.maximizers]:  # type: ignore[attr-defined]
        for ids, claimed in [(one.token_ids, one.values), (one.start_token_ids, None)]:
            if ids is None:
                continue
            with torch.no_grad():
                _, cache = tiny_model.model.run_with_cache(torch.tensor([ids]))
            values = encode(cache[HOOK])[0, :, one.feature]
            values[0] = 0.0  # BOS is not scored
            # TransformerLens' forward against the lean one: float32 rounding, rel 1e-5
            if claimed is not None:
                torch.testing.assert_close(torch.tensor(claimed), values, rtol=1e-5, atol=1e-5)
                assert one.activation == pytest.approx(float(values.max()), rel=1e-5, abs=1e-6)
            else:
                assert one.start_activation == pytest.approx(float(values.max()), rel=1e-5, abs=1e-6)


def test_swap_scores_from_cached_prefixes_equal_full_scores(
    tiny_model: LoadedModel, tokens: torch.Tensor, sae_dir: Path
) -> None:
    from analyses.feature_maximizers.compute import Swaps

    search = search_for(tiny_model, tokens, sae_dir)
    assert search.lean is not None, "the tiny model should run the lean forward"
    generator = torch.Generator().manual_seed(5)
    parents = search.pool[torch.randint(len(search.pool), (3, 6), generator=generator)]  # (P, L)
    member = torch.arange(3).repeat_interleave(6)
    position = torch.arange(6).repeat(3)  # every position of every member, the first included
    candidates = parents[member].clone()
    candidates[torch.arange(18), position] = search.pool[
        torch.randint(len(search.pool), (18,), generator=generator)
    ]
    for feature in (0, 1):
        swapped = search.score_swaps(parents, Swaps(candidates, member, position), feature)
        full = search.score(search.with_bos(candidates), feature, 0.0)
        # the same sums over another split of the sequence: float32 rounding, rel 1e-5
        torch.testing.assert_close(swapped, full, rtol=1e-5, atol=1e-5)


def test_a_bad_init_is_a_located_spec_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from runner.cli import main

    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "name: bad\nsteps:\n  - id: synthetic\n    analysis: feature_maximizers\n    params:\n"
        "      sae: {name: smollm2-135m/blocks.12.hook_resid_post}\n      features: '5'\n"
        "      init: datset\n"
    )
    assert main(["validate", str(spec)]) == 2
    out = capsys.readouterr().out
    assert f"{spec}:8:13: steps[0].params.init: Input should be 'dataset', 'random' or 'mixed'" in out


def test_from_step_over_another_dataset_is_refused(
    tiny_model: LoadedModel, tokens: torch.Tensor, sae_dir: Path
) -> None:
    import analyses.feature_analysis as fa
    from runner.step import FinishedCase

    ctx = StepContext.standalone(
        model=tiny_model, dataset=TokenDataset("other", tokens[:3], "fp-other"), spec_dir=sae_dir
    )
    params = fa.FeatureAnalysisParams(sae={"path": "."}, cards=0)
    real = fa.feature_analysis(ctx, params).result
    finished = {"real": [FinishedCase("real", "real", "feature_analysis", params, "tiny", real)]}
    ctx = StepContext.standalone(
        model=tiny_model,
        dataset=TokenDataset("random", tokens, "fp-random"),
        spec_dir=sae_dir,
        finished=finished,
    )
    with pytest.raises(
        ResourceError, match=r"step `real` analysed another dataset than this case's \(random"
    ):
        fm.feature_maximizers(
            ctx, fm.FeatureMaximizersParams(sae={"path": "."}, features="0", from_step="real")
        )


def test_from_step_gives_the_same_starts_as_the_dataset_pass(
    tiny_model: LoadedModel, tokens: torch.Tensor, sae_dir: Path
) -> None:
    import analyses.feature_analysis as fa
    from analyses.feature_maximizers.compute import _dataset_best
    from runner.step import FinishedCase

    ctx = context(tiny_model, tokens, sae_dir)
    params = fa.FeatureAnalysisParams(sae={"path": "."}, cards=0)
    real = fa.feature_analysis(ctx, params).result
    finished = {"real": [FinishedCase("real", "real", "feature_analysis", params, "tiny", real)]}
    ctx = StepContext.standalone(model=tiny_model, dataset=ctx.dataset, spec_dir=sae_dir, finished=finished)
    (sae,) = ctx.saes(fm.SAESource(path="."), layers=None, site=None, where="test")
    common = {"sae": {"path": "."}, "features": "1,2", "population": 3, "restarts": 3, "init": "mixed"}
    read = _dataset_best(ctx, fm.FeatureMaximizersParams(from_step="real", **common), sae, [1, 2], "test")
    computed = _dataset_best(ctx, fm.FeatureMaximizersParams(**common), sae, [1, 2], "test")
    assert read.source == "step real" and computed.source == "dataset"
    for feature in (1, 2):
        # mixed over 3 restarts: 2 start from the dataset, 3 windows each
        assert read.top[feature][:6] == computed.top[feature] and len(computed.top[feature]) == 6
        # feature_analysis and the search's own pass batch differently: float32 rounding, rel 1e-5
        assert read.maxima[feature] == pytest.approx(computed.maxima[feature], rel=1e-5)
