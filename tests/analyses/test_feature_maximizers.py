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


def last_position_optimum(loaded: LoadedModel, target: int) -> float:
    """The largest activation any token can reach at the last of SEQ_LEN positions after BOS (the
    searches' objective): at ``resid_pre`` of layer 0 a position's stream is its token's embedding
    plus its position's, so the target token there, whatever comes before."""
    w_e, w_pos = loaded.model.W_E.detach(), loaded.model.W_pos.detach()
    return float((w_e[target] + w_pos[SEQ_LEN]) @ (w_e[target] / w_e[target].norm()))


@pytest.mark.parametrize("method", ["discrete", "embedding"])
def test_both_methods_find_the_planted_token(
    output: StepOutput, tiny_model: LoadedModel, target: int, method: str
) -> None:
    one = found(output, method)
    assert one.token_ids[0] == BOS and len(one.token_ids) == SEQ_LEN + 1
    assert one.token_ids[-1] == target, (one.token_ids, target)
    # the same dot product with another order of summation: float32 rounding, not bit-equal
    assert one.values[-1] == pytest.approx(last_position_optimum(tiny_model, target), rel=1e-5)
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
    assert "| 0 |  | discrete |" in markdown and "discrete 1 of 1" in markdown
    html = render_partial(output, "feature_maximizers.html.j2")
    assert "<td>discrete</td>" in html and "feature_0_synthetic" in html


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
