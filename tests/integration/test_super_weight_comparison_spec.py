"""`runner run` on a spec that sweeps two tiny models: super_weights on each, then one comparison.

The two models are checkpoint directories of different architectures (a Llama and a GPT-NeoX), so
accuracy through lm-eval also runs on a non-Llama model, through its transformers view. The
comparison's numbers are checked against the manifest's super_weights summaries.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from matplotlib.image import imread

from runner.planner import load_plan
from runner.registry import load_analyses

MODELS = ("tiny-llama", "tiny-neox")

QUESTIONS = [
    {"question": "The capital of France is", "choices": ["Paris", "Berlin", "Rome"], "answer": 0},
    {"question": "Two plus two equals", "choices": ["four", "five", "six"], "answer": 0},
    {"question": "The sky on a clear day is", "choices": ["green", "blue", "red"], "answer": 1},
    {"question": "A week has seven", "choices": ["days", "hours", "years"], "answer": 0},
]

TASK_YAML = """
task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_target: answer
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

SPEC = """
name: compare
seed: 0
model:
  name: tiny-llama
  device: cpu
dataset:
  name: python-docs
  max_passages: 4
  max_len: 16
sweep:
  product:
    model.name: [tiny-llama, tiny-neox]
steps:
  - id: super_weights
    analysis: super_weights
    params: {spike_threshold: 0.001, layers: "0", max_iterations: 1, batch_size: 4, {accuracy}}
  - id: comparison
    analysis: super_weight_comparison
expectations:
  - step: comparison
    name: both models are compared
    that: "n_models == 2 and models[0].model == 'tiny-llama' and models[1].model == 'tiny-neox'"
"""


@pytest.fixture(scope="module")
def checkpoints(tiny_llama: Any, tiny_tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama and a tiny random GPT-NeoX saved as checkpoint directories, and a local lm-eval task."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    root = tmp_path_factory.mktemp("checkpoints")
    tiny_llama.save_pretrained(root / "tiny-llama")
    tiny_tokenizer.save_pretrained(root / "tiny-llama")
    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=0,
        pad_token_id=2,
    )
    GPTNeoXForCausalLM(config).eval().save_pretrained(root / "tiny-neox")
    tiny_tokenizer.save_pretrained(root / "tiny-neox")
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (tasks / "tiny_mc.yaml").write_text(TASK_YAML.format(data=tasks / "tiny_mc.jsonl"))
    return root


@pytest.fixture
def workdir(checkpoints: Path, tmp_path: Path) -> Path:
    """The models and the task folder under the names the spec uses, in the CLI's working directory."""
    for name in (*MODELS, "tasks"):
        (tmp_path / name).symlink_to(checkpoints / name)
    return tmp_path


def spec_text(accuracy: bool) -> str:
    settings = "accuracy_tasks: [tiny_mc], task_dir: tasks" if accuracy else "perplexity: true"
    return SPEC.replace("{accuracy}", settings)


def test_comparison_runs_once_after_every_model(write_spec: Any, tmp_path: Path) -> None:
    spec = write_spec(spec_text(accuracy=False).replace("[tiny-llama, tiny-neox]", "[a, b]"))
    text = spec.read_text().replace("product:\n", "product:\n    seed: [1, 2]\n")
    spec.write_text(text.replace("  - id: comparison", VOCAB_STEP + "  - id: comparison"))
    load_analyses()
    ids = [case.id for case in load_plan(spec).cases]
    variants = ["seed=1-model.name=a", "seed=1-model.name=b", "seed=2-model.name=a", "seed=2-model.name=b"]
    assert ids == [
        *(f"{step}[{v}]" for v in variants for step in ("super_weights", "vocab")),
        "comparison[seed=1]",
        "comparison[seed=2]",
    ]


VOCAB_STEP = """  - id: vocab
    analysis: super_weight_vocab
    params: {tokens: 30, window_len: 16, stride: 15}
"""


def test_two_models_are_compared_through_the_cli(
    workdir: Path, write_spec: Any, run_cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("lm_eval")
    import runner.resources

    loads: list[str] = []
    load_model = runner.resources.load_model
    monkeypatch.setattr(
        runner.resources, "load_model", lambda name, **kw: loads.append(name) or load_model(name, **kw)
    )
    code, out, _ = run_cli("run", write_spec(spec_text(accuracy=True)))
    assert code == 0, out
    assert "3 passed in" in out
    assert loads == list(MODELS)  # each model once; the comparison loads none
    folder = next((workdir / "runs" / "compare").iterdir())
    cases = json.loads((folder / "manifest.json").read_text())["cases"]
    upstream = [cases[f"super_weights[model.name={name}]"]["summary"] for name in MODELS]
    assert list(cases) == [*(f"super_weights[model.name={name}]" for name in MODELS), "comparison"]

    summary = json.loads((folder / "data/comparison/cross_model_summary.json").read_text())
    assert summary["n_models"] == 2
    for name, row, up in zip(MODELS, summary["models"], upstream, strict=True):
        assert row["model"] == name and row["n_super_weights"] == up["n_found"] >= 1
        assert [[w["layer"], w["row"], w["col"]] for w in row["super_weights"]] == [
            [w["layer"], w["row"], w["col"]] for w in up["weights"]
        ]
        assert row["perplexity"]["baseline"] == up["ppl"]["baseline"]  # copied from the upstream case
        assert row["perplexity"]["ratio_all"] == pytest.approx(
            up["ppl"]["all_zeroed"] / up["ppl"]["baseline"]
        )
        accuracy, measured = row["accuracy"]["tiny_mc"], up["accuracy"]["tiny_mc"]
        assert measured["n"] == len(QUESTIONS) and measured["baseline"] is not None  # also on GPT-NeoX
        assert accuracy["delta_all_zeroed"] == pytest.approx(measured["all_zeroed"] - measured["baseline"])
        assert accuracy["delta_random_control"] == pytest.approx(
            measured["random_control"] - measured["baseline"]
        )
    image = imread(folder / "plots/comparison/model_comparison.png")
    assert image.shape[0] > 100 and image.shape[1] > 100
    report = (folder / "report.md").read_text()
    assert "Super weights across 2 models" in report and "`tiny-neox` | tiny_mc" in report


def test_step_without_resources_listed_first_runs_once_before_every_model(write_spec: Any) -> None:
    spec = write_spec("""
        name: first
        sweep:
          product: {model.name: [a, b]}
        steps:
          - id: toy
            analysis: toy
          - id: super_weights
            analysis: super_weights
    """)
    load_analyses()
    ids = [case.id for case in load_plan(spec).cases]
    assert ids == ["toy", "super_weights[model.name=a]", "super_weights[model.name=b]"]
