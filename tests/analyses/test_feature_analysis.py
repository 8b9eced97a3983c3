"""feature_analysis against brute-force computations on a tiny model and a tiny SAE built here."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

import analyses.feature_analysis as fa
from analyses._features import FINE_BINS, FeatureAccumulator, sample_keys
from analyses._features_saes import dictionary_learning_sae
from runner.artifacts import RunFolder
from runner.datasets import TokenDataset
from runner.errors import ResourceError
from runner.models import LoadedModel
from runner.step import StepContext, StepOutput

BOS = 1  # the tiny tokenizer's <|bos|>
SPECIAL = (0, 1, 2)
D_SAE = 16
HOOK = "blocks.1.hook_resid_post"
BATCH = 3


def make_sae(loaded: LoadedModel, tokens: torch.Tensor) -> Any:
    """A random standard SAE whose features fire on 50% down to 2% of the tokens (biases set from
    quantiles of the pre-activations), with decoder rows of random lengths."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    d_in = loaded.model.cfg.d_model
    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=D_SAE, metadata=SAEMetadata(hook_name=HOOK)))
    with torch.no_grad():
        _, cache = loaded.model.run_with_cache(tokens, padding_side="right")
        acts = cache[HOOK][:, 1:].flatten(0, 1)  # (N, d_in)
        sae.b_dec.zero_()
        sae.W_enc.normal_(0, 1 / d_in**0.5)
        pre = acts @ sae.W_enc  # (N, d_sae)
        quantiles = torch.linspace(0.5, 0.98, D_SAE)
        sae.b_enc.copy_(-torch.stack([pre[:, i].quantile(q) for i, q in enumerate(quantiles)]))
        sae.W_dec.copy_(torch.randn(D_SAE, d_in) * torch.rand(D_SAE, 1))
    return sae.eval()


def make_tokens(n: int = 10, length: int = 14, seed: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, 320, (n, length), generator=generator)  # (n, T)
    tokens[:, 0] = BOS
    tokens[4, 7] = 0  # an EOS inside a passage: a special token, never counted
    return tokens


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return make_tokens()


@pytest.fixture(scope="module")
def sae_dir(tiny_model: LoadedModel, tokens: torch.Tensor, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("feature_sae")
    make_sae(tiny_model, tokens).save_model(directory)
    return directory


def run(loaded: LoadedModel, tokens: torch.Tensor, spec_dir: Path, **params: Any) -> StepOutput:
    ctx = StepContext.standalone(
        model=loaded, dataset=TokenDataset("random", tokens, "x"), seed=7, spec_dir=spec_dir
    )
    params.setdefault("sae", {"path": "."})
    params.setdefault("batch_size", BATCH)
    return fa.feature_analysis(ctx, fa.FeatureAnalysisParams(**params))


@pytest.fixture(scope="module")
def output(tiny_model: LoadedModel, tokens: torch.Tensor, sae_dir: Path) -> StepOutput:
    return run(tiny_model, tokens, sae_dir, max_examples=4, interval_samples=3, buffer=(2, 3), cards=3)


@pytest.fixture(scope="module")
def brute(tiny_model: LoadedModel, tokens: torch.Tensor, sae_dir: Path) -> np.ndarray:
    """``(P * T, d_sae)`` every feature's activation at every token, 0 at special tokens.

    The activations come from TransformerLens' forward on the same batches as the analysis (the same
    computation, so the same floats on any CPU: a feature near its threshold fires in both or
    neither); everything computed from them below is independent of the analysis' code.
    """
    from sae_lens import SAE

    sae = SAE.load_from_disk(sae_dir)
    out = []
    with torch.no_grad():
        for start in range(0, len(tokens), BATCH):
            batch = tokens[start : start + BATCH]
            resid = tiny_model.model(batch, stop_at_layer=2, padding_side="right")  # (B, T, d)
            out.append(sae.encode(resid))
    acts = torch.cat(out).numpy().reshape(-1, D_SAE)
    special = np.isin(tokens.numpy().reshape(-1), SPECIAL)
    acts[special] = 0.0
    return acts


def result(output: StepOutput) -> fa.FeatureAnalysisResult:
    assert isinstance(output.result, fa.FeatureAnalysisResult)
    return output.result


def records(output: StepOutput) -> dict[int, dict[str, Any]]:
    return {r["feature_index"]: r for r in output.data["features.jsonl"]}


def test_density_moments_and_maximum_match_brute_force(output: StepOutput, brute: np.ndarray) -> None:
    layer = result(output).layers[1]
    counted = brute.shape[0] - 11  # 10 BOS and one EOS left out
    assert result(output).n_tokens == counted
    np.testing.assert_array_equal(layer.density, (brute > 0).sum(0) / counted)
    np.testing.assert_array_equal(layer.max_activation, brute.max(0))
    fired_mean = [brute[:, f][brute[:, f] > 0].astype(np.float64).mean() for f in range(D_SAE)]
    np.testing.assert_allclose(layer.mean_activation, fired_mean, rtol=1e-12)  # float64 sums, any order
    assert layer.n_alive == D_SAE and 0.02 < float(layer.density.min()) < float(layer.density.max()) < 0.6


def test_result_keeps_where_each_top_activation_is_and_the_dataset(
    output: StepOutput, brute: np.ndarray
) -> None:
    layer = result(output).layers[1]
    assert result(output).dataset == "x"  # the fingerprint feature_maximizers checks with from_step
    assert layer.top_tokens.shape == layer.top_values.shape == (D_SAE, 4)
    for f in range(D_SAE):
        order = np.argsort(-brute[:, f], kind="stable")[:4]
        fired = brute[order, f] > 0
        np.testing.assert_array_equal(layer.top_tokens[f][fired], order[fired])  # ties: the earlier token
        assert (layer.top_tokens[f][~fired] == -1).all()
        np.testing.assert_array_equal(layer.top_values[f], np.where(fired, brute[order, f], 0))


def test_histogram_counts_every_activation_in_its_equal_width_bin(
    output: StepOutput, brute: np.ndarray
) -> None:
    for f, record in records(output).items():
        fired = brute[:, f][brute[:, f] > 0].astype(np.float64)
        centres = np.asarray(record["freq_hist_data_bar_values"])
        width = centres[1] - centres[0]
        top = centres[-1] + width / 2
        assert fired.max() < top <= 1.2 * fired.max() + 1e-12  # [0, R], R at most 1.2 x the maximum
        expected = np.histogram(fired, bins=50, range=(0, top))[0]
        got = np.asarray(record["freq_hist_data_bar_heights"])
        # a value within rounding of a bin edge may land on either side in np.histogram's float64 edges
        assert got.sum() == len(fired) and np.abs(np.cumsum(got - expected)).max() <= 1


def test_top_examples_are_the_largest_activations_with_their_windows(
    output: StepOutput, brute: np.ndarray, tokens: torch.Tensor
) -> None:
    length = tokens.shape[1]
    acts = brute.reshape(len(tokens), length, D_SAE)
    for f, record in records(output).items():
        top = [a for a in record["activations"] if a["bin_min"] == -1]
        order = np.argsort(-brute[:, f], kind="stable")[:4]
        order = order[brute[order, f] > 0]  # only tokens where it fires are examples
        peaks = [a["values"][a["qualifying_token_index"]] for a in top]
        assert peaks == pytest.approx(brute[order, f].tolist(), rel=1e-6)
        for example, flat in zip(top, order, strict=True):
            passage, position = divmod(int(flat), length)
            lo, hi = max(position - 2, 0), min(position + 4, length)
            assert example["values"] == pytest.approx(acts[passage, lo:hi, f].tolist(), rel=1e-6, abs=1e-7)
            assert example["qualifying_token_index"] == position - lo
            assert len(example["tokens"]) == hi - lo


def test_interval_samples_are_the_smallest_keys_of_each_interval(
    output: StepOutput, brute: np.ndarray
) -> None:
    n = brute.shape[0]
    for f, record in records(output).items():
        fired = brute[:, f] > 0
        values = brute[:, f].astype(np.float64)
        hi = 2.0 ** np.frexp(values.max())[1]
        fine = np.floor(values * FINE_BINS / hi)
        keys = sample_keys(torch.arange(n), torch.full((n,), f), seed=7).numpy()
        intervals = [a for a in record["activations"] if a["bin_min"] != -1]
        edges = sorted({(a["bin_min"], a["bin_max"], a["bin_contains"]) for a in intervals})
        assert len(edges) <= 10 and sum(c for *_, c in edges) == pytest.approx(1.0)
        for lo, high, contains in edges:
            first, last = round(lo * FINE_BINS / hi), round(high * FINE_BINS / hi)
            members = np.flatnonzero(fired & (fine >= first) & (fine < last))
            chosen = members[np.argsort(keys[members], kind="stable")][:3]
            got = [a for a in intervals if a["bin_min"] == lo]
            assert contains == pytest.approx(len(members) / fired.sum())
            assert [a["values"][a["qualifying_token_index"]] for a in got] == pytest.approx(
                values[chosen].tolist(), rel=1e-6
            )


def test_accumulator_gives_the_same_samples_for_any_batching() -> None:
    """The doubling histogram and sample merges make results independent of how tokens are batched."""
    torch.manual_seed(0)
    acts = torch.relu(torch.randn(12, 9, 5) * torch.tensor([0.3, 1.0, 4.0, 20.0, 300.0]))  # (P, T, F)
    eligible = torch.ones(12, 9, dtype=torch.bool)
    tables = []
    for size in (1, 5, 12):
        acc = FeatureAccumulator(torch.arange(5), top_k=3, buffer=(1, 1), samples=2, seed=1)
        for start in range(0, 12, size):
            acc.add(acts[start : start + size].clone(), eligible[start : start + size], start * 9)
        tables.append(acc.finish())
    for other in tables[1:]:
        np.testing.assert_array_equal(tables[0].fine_hist, other.fine_hist)
        np.testing.assert_array_equal(tables[0].top_tokens, other.top_tokens)
        for f in range(5):
            mine = [(int(t), float(v)) for iv in tables[0].intervals(f) for v, t, _ in iv["samples"]]
            theirs = [(int(t), float(v)) for iv in other.intervals(f) for v, t, _ in iv["samples"]]
            assert sorted(mine) == sorted(theirs)


def test_logit_effects_are_the_decoder_rows_through_the_unembedding(
    output: StepOutput, tiny_model: LoadedModel, sae_dir: Path
) -> None:
    from sae_lens import SAE

    w_dec = SAE.load_from_disk(sae_dir).W_dec.detach()
    effects = w_dec @ tiny_model.model.W_U.detach()  # (d_sae, V)
    vocab = tiny_model.tokenizer.batch_decode([[i] for i in range(effects.shape[1])])
    for f, record in records(output).items():
        top = effects[f].topk(10)
        assert record["pos_str"] == [vocab[i] for i in top.indices]
        assert record["pos_values"] == pytest.approx(top.values.tolist(), rel=1e-5)
        assert record["neg_values"] == pytest.approx(
            effects[f].topk(10, largest=False).values.tolist(), rel=1e-5
        )
        assert sum(record["logits_hist_data_bar_heights"]) == effects.shape[1]
        assert record["decoder_norm"] == pytest.approx(float(w_dec[f].norm()), rel=1e-6)


def test_neuronpedia_json_round_trips_through_the_run_folder(output: StepOutput, tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    folder.write_data("case", output.data)
    lines = (tmp_path / "data" / "case" / "features.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == output.data["features.jsonl"]
    first = json.loads(lines[0])
    for key in (
        "feature_index",
        "frac_nonzero",
        "pos_str",
        "pos_values",
        "neg_str",
        "neg_values",
        "activations",
    ):
        assert key in first
    for name in ("freq_hist_data_bar", "logits_hist_data_bar"):
        assert (
            len(first[f"{name}_values"]) == len(first[f"{name}_heights"]) == 50
        )  # parallel, as Neuronpedia reads
    for group in first["activations"]:
        assert len(group["tokens"]) == len(group["values"]) and set(group) >= {
            "bin_min",
            "bin_max",
            "bin_contains",
        }


def test_features_csv_reads_as_a_features_csv(output: StepOutput, tmp_path: Path, brute: np.ndarray) -> None:
    RunFolder(tmp_path).write_data("case", output.data)
    table = pd.read_csv(tmp_path / "data" / "case" / "features.csv", keep_default_na=False)
    assert list(table.columns[:3]) == ["layer", "feature", "label"]
    assert table["feature"].tolist() == list(range(D_SAE)) and set(table["layer"]) == {1}
    np.testing.assert_allclose(table["max"], brute.max(0), rtol=1e-6)


def test_cards_list_csv_features_first_then_the_densest(
    tiny_model: LoadedModel, tokens: torch.Tensor, sae_dir: Path, brute: np.ndarray
) -> None:
    (sae_dir / "labels.csv").write_text('layer,feature,label\n1,9,"a label"\n')
    out = run(tiny_model, tokens, sae_dir, features="0-3", features_csv="labels.csv", cards=4)
    cards = result(out).cards
    assert [(c.feature, c.why, c.label) for c in cards[:1]] == [(0, "listed", "")]
    assert [c.feature for c in cards] == [0, 1, 2, 3]  # the listed features fill the cards
    assert sorted(r["feature_index"] for r in out.data["features.jsonl"]) == [0, 1, 2, 3, 9]
    out = run(tiny_model, tokens, sae_dir, features_csv="labels.csv", cards=3)
    densest = [int(f) for f in np.argsort(-(brute > 0).sum(0), kind="stable") if f != 9][:2]
    assert [(c.feature, c.why) for c in result(out).cards] == [(9, "csv")] + [
        (f, "top_frequency") for f in densest
    ]
    assert result(out).cards[0].label == "a label"


def test_most_correlated_features_match_numpy_corrcoef(
    tiny_model: LoadedModel,
    tokens: torch.Tensor,
    sae_dir: Path,
    brute: np.ndarray,
    render_partial: Callable[..., str],
) -> None:
    (sae_dir / "corr.csv").write_text('layer,feature,label\n1,9,"a label"\n')
    out = run(tiny_model, tokens, sae_dir, features_csv="corr.csv", cards=2, correlated=5)
    counted = ~np.isin(tokens.numpy().reshape(-1), SPECIAL)
    expected = np.corrcoef(brute[counted].astype(np.float64).T)[9]  # (D_SAE,) over counted positions
    expected[9] = -np.inf
    order = np.argsort(-expected, kind="stable")[:5]
    card = result(out).cards[0]
    assert card.feature == 9 and [c["feature"] for c in card.correlated] == order.tolist()  # type: ignore[index]
    # float64 sums of the same float32 activations, another formula: rounding far below 1e-9 (the
    # card's values are rounded to 4 decimals, the record's are not)
    got = [c["pearson"] for c in card.correlated]  # type: ignore[index]
    np.testing.assert_allclose(got, np.round(expected[order], 4), atol=5e-5)
    (record,) = [r for r in out.data["features.jsonl"] if r["feature_index"] == 9]
    assert record["correlated_features_indices"] == order.tolist()
    np.testing.assert_allclose(record["correlated_features_pearson"], expected[order], rtol=1e-9, atol=1e-12)
    assert result(out).cards[1].correlated == []  # chosen after the pass: none
    assert "correlated_features_indices" not in records(out)[0]
    assert f"Most correlated features (Pearson): {order[0]} " in render_partial(out, "feature_analysis.md.j2")
    assert "<th>correlated feature</th>" in render_partial(out, "feature_analysis.html.j2")


def test_a_feature_past_the_sae_is_a_clear_error(
    tiny_model: LoadedModel, tokens: torch.Tensor, sae_dir: Path
) -> None:
    with pytest.raises(ResourceError, match=r"features \[16, 40\] do not exist .* which has 16 features"):
        run(tiny_model, tokens, sae_dir, features="2,16,40")


def test_report_partials_render_cards_with_values_on_hover(
    output: StepOutput, render_partial: Callable[..., str]
) -> None:
    html = render_partial(output, "feature_analysis.html.j2")
    card = result(output).cards[0]
    assert f'id="feature-1-{card.feature}"' in html and html.count('class="fcard"') == 3
    first = card.examples[0]
    assert f'title="{first["values"][first["index"]]:.4g}"' in html  # the activation on hover
    assert "feature_" in html and "statistics_real" in html
    markdown = render_partial(output, "feature_analysis.md.j2")
    assert f"#### Layer 1, feature {card.feature}" in markdown and "⟦" in markdown


def test_a_newline_token_shows_as_a_return_arrow_not_a_line_break(
    output: StepOutput, render_partial: Callable[..., str]
) -> None:
    """Contexts of text with line breaks (docs, code) would break the card's rows; SAE dashboards show
    a newline token as a return arrow, so do the cards."""
    res = result(output)
    card = res.cards[0]
    example = {**card.examples[0], "tokens": ["x\ny", *card.examples[0]["tokens"][1:]]}
    card = card.model_copy(update={"examples": [example, *card.examples[1:]]})
    changed = StepOutput(result=res.model_copy(update={"cards": [card, *res.cards[1:]]}), data={})
    html = render_partial(changed, "feature_analysis.html.j2")
    assert ">x\u21b5y</span>" in html and "x\ny" not in html


def write_dictionary_learning(directory: Path, w_enc: torch.Tensor, b_enc: torch.Tensor, k: int) -> None:
    """An AutoEncoderTopK checkpoint as dictionary_learning saves it (nn.Linear layouts)."""
    d_in, d_sae = w_enc.shape
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "encoder.weight": w_enc.T.contiguous(),
        "encoder.bias": b_enc,
        "decoder.weight": torch.randn(d_in, d_sae),
        "b_dec": torch.randn(d_in) * 0.1,
        "k": torch.tensor(k),
        "threshold": torch.tensor(-1.0),
    }
    torch.save(state, directory / "ae.pt")
    trainer = {
        "dict_class": "AutoEncoderTopK",
        "activation_dim": d_in,
        "dict_size": d_sae,
        "k": k,
        "layer": 1,
    }
    (directory / "config.json").write_text(
        json.dumps({"trainer": {**trainer, "lm_name": "tiny"}, "buffer": {}})
    )


def test_dictionary_learning_topk_checkpoint_encodes_as_its_own_formula(tmp_path: Path) -> None:
    torch.manual_seed(0)
    w_enc, b_enc = torch.randn(32, 40), torch.randn(40)
    write_dictionary_learning(tmp_path / "dl", w_enc, b_enc, k=5)
    sae = dictionary_learning_sae(tmp_path / "dl")
    state = torch.load(tmp_path / "dl" / "ae.pt", weights_only=True)
    x = torch.randn(7, 32)
    post = torch.relu((x - state["b_dec"]) @ w_enc + b_enc)  # dictionary_learning's AutoEncoderTopK.encode
    top = post.topk(5, dim=-1)
    expected = torch.zeros_like(post).scatter_(-1, top.indices, top.values)
    torch.testing.assert_close(sae.encode(x), expected, rtol=1e-5, atol=1e-5)
    decoded = expected @ state["decoder.weight"].T + state["b_dec"]
    torch.testing.assert_close(sae.decode(expected), decoded, rtol=1e-5, atol=1e-5)


def test_feature_analysis_reads_a_dictionary_learning_folder(
    tiny_model: LoadedModel, tokens: torch.Tensor, tmp_path: Path
) -> None:
    torch.manual_seed(1)
    write_dictionary_learning(tmp_path / "dl", torch.randn(32, 12) / 6, torch.zeros(12), k=3)
    out = run(tiny_model, tokens, tmp_path, sae={"path": "dl"}, cards=1)
    assert result(out).layers[1].hook == HOOK and result(out).layers[1].mean_l0 == pytest.approx(3.0)
    assert "dictionary_learning checkpoint" in result(out).layers[1].sae["source"]


def test_dictionary_learning_of_another_width_names_file_sizes_and_hook(
    tiny_model: LoadedModel, tokens: torch.Tensor, tmp_path: Path
) -> None:
    write_dictionary_learning(tmp_path / "wide", torch.randn(48, 12), torch.zeros(12), k=3)
    with pytest.raises(ResourceError) as error:
        run(tiny_model, tokens, tmp_path, sae={"path": "wide"})
    message = str(error.value)
    assert "wide/ae.pt" in message and "48-dimensional" in message and "has 32" in message and HOOK in message


def test_an_unknown_dictionary_learning_class_is_named(tmp_path: Path) -> None:
    write_dictionary_learning(tmp_path / "dl", torch.randn(8, 4), torch.zeros(4), k=1)
    config = json.loads((tmp_path / "dl" / "config.json").read_text())
    config["trainer"]["dict_class"] = "VSAETopK"
    (tmp_path / "dl" / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ResourceError, match=r"config.json: unknown dictionary_learning dict_class 'VSAETopK'"
    ):
        dictionary_learning_sae(tmp_path / "dl")
