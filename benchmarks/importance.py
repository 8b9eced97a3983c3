"""Benchmark: the quickstart's ``activation_importance`` cases against the same forwards in transformers.

One process, one workload (the embedded SmolLM2-135M on the quickstart's dataset: python-docs, 32
passages x 128 tokens, batches of 8, every MLP layer), measured two ways:

- **floor**: the same weights, read from the runner's weight cache into a transformers
  ``LlamaForCausalLM`` (SDPA attention), run directly. ``values``: forward passes that read every
  MLP activation (the input of ``down_proj``, d_mlp wide) and sum it and its absolute value per
  dimension. ``gradients``: forward and backward of the summed next-token loss to every MLP
  activation (no parameter gradients).
- **runner**: the registered ``activation_importance`` function called on a ``StepContext`` with the
  quickstart's parameters, as the executor calls it; then its data files and plots written into a
  scratch run folder, as the executor writes them (a case's time in the console includes both).

The two must agree: per layer, the mean and mean |x| of the floor, normalized as the quickstart
normalizes them (``sum_abs``), against the case's ``consolidated_results.npz`` (exit status 1 above
``--tolerance``). Also measured, each in a fresh process: importing torch, transformers and
TransformerLens, then ``runner.models.load_model("smollm2-135m")`` from the warm weight cache.

Prints a table (CPU model, matmul rate measured in the same run, load average, each time and its
ratio to the floor) and writes everything as JSON (default ``runs/benchmarks/importance-<time>.json``).

    python benchmarks/importance.py                 # the quickstart's workload, best of 2 runs each
    python benchmarks/importance.py --quick         # 8 passages x 64 tokens, once each: a smoke test

Targets (issue "Speed of what every user runs first"): each case within 1.5x its floor, the
cached load under 3 s, the quickstart under 60 s wall once the cache exists.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _machine import ROOT, machine, write_json
from _machine import matmul_rate as shaped_matmul_rate

QUICKSTART = ROOT / "specs" / "quickstart.yaml"
MODES = ("values", "gradients")
TARGET_RATIO = 1.5
TARGET_LOAD_SECONDS = 3.0
TARGET_QUICKSTART_SECONDS = 60.0

LOAD_CHILD = """
import json, sys, time
times = {}
started = time.perf_counter()
import torch
times["import_torch"] = time.perf_counter() - started
for module in ("transformers", "transformer_lens", "runner.models"):
    mark = time.perf_counter()
    __import__(module)
    times["import_" + module.replace(".", "_")] = time.perf_counter() - mark
if len(sys.argv) > 1:
    torch.set_num_threads(int(sys.argv[1]))
from runner.models import load_model
mark = time.perf_counter()
loaded = load_model("smollm2-135m", device="cpu", dtype="float32")
times["load_model"] = time.perf_counter() - mark
times["total"] = time.perf_counter() - started
times["from_cache"] = loaded.info.get("from_cache")
print(json.dumps(times))
"""
"""A fresh process: each import timed on its own (in the order ``load_model`` would trigger them),
then ``load_model`` with every import already done."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 passages x 64 tokens, batch 4, run once")
    parser.add_argument("--passages", type=int, default=None, help="python-docs passages (quickstart: 32)")
    parser.add_argument("--max-len", type=int, default=None, help="tokens per passage (quickstart: 128)")
    parser.add_argument("--batch-size", type=int, default=None, help="passages per pass (quickstart: 8)")
    parser.add_argument("--repeats", type=int, default=None, help="runs of each method, best kept (2)")
    parser.add_argument("--load-runs", type=int, default=None, help="fresh processes timing the load (3)")
    parser.add_argument("--modes", default="values,gradients", help="cases to run (default both)")
    parser.add_argument(
        "--quickstart",
        action="store_true",
        help="also time `runner run specs/quickstart.yaml` end to end in a fresh process (1-2 min)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="PARAM=VALUE",
        help="override a parameter of the quickstart's step (VALUE read as YAML); repeatable",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="largest allowed |runner - floor| / max |floor| per layer and variant (default 1e-4)",
    )
    parser.add_argument(
        "--output", default=None, help="JSON path (default runs/benchmarks/importance-*.json)"
    )
    args = parser.parse_args(argv)
    quick = {"passages": 8, "max_len": 64, "batch_size": 4, "repeats": 1, "load_runs": 1}
    full = {"repeats": 2, "load_runs": 3}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.modes = [m for m in args.modes.split(",") if m]
    if not set(args.modes) <= set(MODES):
        parser.error(f"--modes takes {', '.join(MODES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    step = quickstart_step(args)
    # Loads first, while this process holds no model (the first builds the weight cache if there is
    # none yet, and is not counted).
    loads = [load_in_fresh_process(args.threads) for _ in range(args.load_runs + 1)][1:]
    loaded, dataset = load_workload(step)
    floor_model = build_floor_model(Path(loaded.info["cache_entry"]))
    rates = [matmul_rate(loaded)]
    cases: dict[str, Any] = {}
    for mode in args.modes:
        cases[mode] = measure_mode(mode, loaded, floor_model, dataset, step, args.repeats)
        rates.append(matmul_rate(loaded))
    # The machine is shared: the best rate seen is the closest to what the hardware does unloaded.
    result = summarize(step, dataset, cases, loads, max(rates), load_before, args)
    if args.quickstart:
        result["quickstart"] = run_quickstart(args.threads)
    print_table(result)
    write(result, args.output)
    return 0 if all(c["max_relative_difference"] <= args.tolerance for c in cases.values()) else 1


# ----------------------------------------------------------------------------------------------
# Workload


def quickstart_step(args: argparse.Namespace) -> dict[str, Any]:
    """The quickstart's model, dataset and ``importance`` step parameters, with command-line overrides."""
    import yaml

    spec = yaml.safe_load(QUICKSTART.read_text())
    (step,) = [s for s in spec["steps"] if s["analysis"] == "activation_importance"]
    params = dict(step["params"])
    if args.batch_size is not None:
        params["batch_size"] = args.batch_size
    for setting in args.set:
        name, _, value = setting.partition("=")
        params[name.strip()] = yaml.safe_load(value)
    return {
        "model": spec["model"]["name"],
        "dataset": spec["dataset"]["name"],
        "passages": args.passages or spec["dataset"]["max_passages"],
        "max_len": args.max_len or spec["dataset"]["max_len"],
        "params": params,
    }


def load_workload(step: dict[str, Any]) -> tuple[Any, Any]:
    """The model as ``runner`` loads it and the dataset as ``runner`` tokenizes it."""
    from runner.datasets import TokenDataset, fingerprint_tokens, load_text, tokenize_passages
    from runner.models import load_model

    loaded = load_model(step["model"], device="cpu", dtype="float32")
    tokens = tokenize_passages(
        load_text(step["dataset"]),
        loaded.tokenizer,
        max_passages=step["passages"],
        max_len=step["max_len"],
        prepend_bos=bool(loaded.model.cfg.default_prepend_bos),
    )  # (passages, max_len)
    return loaded, TokenDataset(step["dataset"], tokens, fingerprint_tokens(tokens))


def load_in_fresh_process(threads: int | None) -> dict[str, Any]:
    """Import and load times of one fresh process (see :data:`LOAD_CHILD`)."""
    command = [sys.executable, "-c", LOAD_CHILD, *([str(threads)] if threads else [])]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the load process failed:\n{done.stderr}")
    times = json.loads(done.stdout.strip().splitlines()[-1])
    times["process_wall"] = time.perf_counter() - started
    times["load_average"] = os.getloadavg()[0]
    print(
        f"{'cached load':>24}: {times['load_model']:8.2f} s  (imports {imports_seconds(times):.2f} s; "
        f"load average {times['load_average']:.2f})",
        file=sys.stderr,
    )
    return times


def run_quickstart(threads: int | None) -> dict[str, Any]:
    """Wall time of ``runner run specs/quickstart.yaml`` in a fresh process, into a scratch folder."""
    code = "import sys; from runner.cli import main; sys.exit(main(sys.argv[1:]))"
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    with tempfile.TemporaryDirectory(prefix="importance-quickstart-") as folder:
        command = [
            sys.executable,
            "-c",
            code,
            "run",
            str(QUICKSTART),
            "--output-dir",
            folder,
            "-q",
            "--no-cache",
        ]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        seconds = time.perf_counter() - started
    print(
        f"{'quickstart':>24}: {seconds:8.2f} s wall, exit status {done.returncode}  "
        f"(load average {os.getloadavg()[0]:.2f})",
        file=sys.stderr,
    )
    return {
        "seconds": seconds,
        "exit_status": done.returncode,
        "load_average": os.getloadavg()[0],
        "output_tail": (done.stdout + done.stderr)[-2000:],
    }


def imports_seconds(times: dict[str, Any]) -> float:
    return float(sum(v for k, v in times.items() if k.startswith("import_")))


# ----------------------------------------------------------------------------------------------
# The floor: transformers' LlamaForCausalLM on the same weights


def build_floor_model(entry: Path) -> Any:
    """A transformers ``LlamaForCausalLM`` holding the weights of the weight-cache entry ``entry``.

    The entry holds TransformerLens weights (``weights.safetensors``) and their config; this is the
    inverse of TransformerLens' ``convert_llama_weights``, every matrix contiguous in the layout
    ``nn.Linear`` reads. The comparison of the results checks it.
    """
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = json.loads((entry / "config.json").read_text())["config"]
    weights = load_file(str(entry / "weights.safetensors"))
    settings: dict[str, Any] = dict(
        vocab_size=cfg["d_vocab"],
        hidden_size=cfg["d_model"],
        intermediate_size=cfg["d_mlp"],
        num_hidden_layers=cfg["n_layers"],
        num_attention_heads=cfg["n_heads"],
        num_key_value_heads=cfg["n_key_value_heads"] or cfg["n_heads"],
        head_dim=cfg["d_head"],
        max_position_embeddings=cfg["n_ctx"],
        rms_norm_eps=cfg["eps"],
        hidden_act=cfg["act_fn"],
        rope_parameters={"rope_type": "default", "rope_theta": cfg["rotary_base"]},
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        attn_implementation="sdpa",
    )
    config = LlamaConfig(**settings)
    model = LlamaForCausalLM(config)
    model.load_state_dict(llama_state_dict(weights, cfg["n_layers"]), strict=True)
    return model.eval().requires_grad_(False)


def llama_state_dict(tl: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """TransformerLens Llama weights → transformers ``LlamaForCausalLM`` state dict (biases must be zero)."""
    for name, tensor in tl.items():
        if name.endswith(("b_Q", "_b_K", "_b_V", "b_O", "b_in", "b_out", "b_U")) and tensor.any():
            raise SystemExit(f"{name} is not zero: a Llama without biases cannot hold it")

    def heads_in(w: torch.Tensor) -> torch.Tensor:  # (heads, d_model, d_head) → (heads d_head, d_model)
        return w.permute(0, 2, 1).reshape(-1, w.shape[1]).contiguous()

    out = {
        "model.embed_tokens.weight": tl["embed.W_E"],
        "model.norm.weight": tl["ln_final.w"],
        "lm_head.weight": tl["unembed.W_U"].T.contiguous(),
    }
    for layer in range(n_layers):
        b, hf = f"blocks.{layer}.", f"model.layers.{layer}."
        w_o = tl[b + "attn.W_O"]  # (heads, d_head, d_model)
        out |= {
            hf + "self_attn.q_proj.weight": heads_in(tl[b + "attn.W_Q"]),
            hf + "self_attn.k_proj.weight": heads_in(tl[b + "attn._W_K"]),
            hf + "self_attn.v_proj.weight": heads_in(tl[b + "attn._W_V"]),
            hf + "self_attn.o_proj.weight": w_o.reshape(-1, w_o.shape[-1]).T.contiguous(),
            hf + "input_layernorm.weight": tl[b + "ln1.w"],
            hf + "post_attention_layernorm.weight": tl[b + "ln2.w"],
            hf + "mlp.gate_proj.weight": tl[b + "mlp.W_gate"].T.contiguous(),
            hf + "mlp.up_proj.weight": tl[b + "mlp.W_in"].T.contiguous(),
            hf + "mlp.down_proj.weight": tl[b + "mlp.W_out"].T.contiguous(),
        }
    return out


def floor_values(model: Any, tokens: torch.Tensor, batch_size: int) -> dict[int, tuple[np.ndarray, ...]]:
    """Forward passes reading every MLP activation; per layer (mean, mean |x|) over every position."""
    sums: dict[int, list[torch.Tensor]] = {}

    def reader(layer: int) -> Any:
        def hook(module: Any, args: tuple[torch.Tensor, ...]) -> None:
            flat = args[0].reshape(-1, args[0].shape[-1])  # (B T, d_mlp)
            add(sums, layer, flat)

        return hook

    handles = [
        block.mlp.down_proj.register_forward_pre_hook(reader(layer))
        for layer, block in enumerate(model.model.layers)
    ]
    try:
        with torch.inference_mode():
            for start in range(0, len(tokens), batch_size):
                model.model(input_ids=tokens[start : start + batch_size], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return means(sums, tokens.numel())


def floor_gradients(model: Any, tokens: torch.Tensor, batch_size: int) -> dict[int, tuple[np.ndarray, ...]]:
    """Forward and backward of the summed next-token loss to every MLP activation; per layer
    (mean, mean |dL/dx|) over every position. The first layer's activation is the leaf."""
    import torch.nn.functional as F

    acts: dict[int, torch.Tensor] = {}
    sums: dict[int, list[torch.Tensor]] = {}

    def keeper(layer: int) -> Any:
        def hook(module: Any, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor]:
            act = args[0] if args[0].requires_grad else args[0].detach().requires_grad_(True)
            acts[layer] = act
            return (act,)

        return hook

    handles = [
        block.mlp.down_proj.register_forward_pre_hook(keeper(layer))
        for layer, block in enumerate(model.model.layers)
    ]
    try:
        for start in range(0, len(tokens), batch_size):
            batch = tokens[start : start + batch_size]  # (B, T)
            # The next token at each position; the last position predicts nothing (ignored), so the
            # logits need no shifted copy.
            targets = F.pad(batch[:, 1:], (0, 1), value=-100)  # (B, T)
            with torch.enable_grad():
                logits = model(input_ids=batch, use_cache=False).logits  # (B, T, d_vocab)
                loss = F.cross_entropy(
                    logits.view(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum", ignore_index=-100
                )
                grads = torch.autograd.grad(loss, [acts[layer] for layer in sorted(acts)])
            for layer, grad in zip(sorted(acts), grads, strict=True):
                add(sums, layer, grad.reshape(-1, grad.shape[-1]))
            acts.clear()
    finally:
        for handle in handles:
            handle.remove()
    return means(sums, tokens.numel())


def add(sums: dict[int, list[torch.Tensor]], layer: int, flat: torch.Tensor) -> None:
    """Add the per-dimension sum and sum of |x| of ``flat`` ``(N, D)`` to ``sums[layer]`` (float64)."""
    total, abs_total = flat.sum(0, dtype=torch.float64), flat.abs().sum(0, dtype=torch.float64)
    if layer in sums:
        sums[layer][0] += total
        sums[layer][1] += abs_total
    else:
        sums[layer] = [total, abs_total]


def means(sums: dict[int, list[torch.Tensor]], count: int) -> dict[int, tuple[np.ndarray, ...]]:
    return {layer: tuple(t.numpy() / count for t in pair) for layer, pair in sorted(sums.items())}


# ----------------------------------------------------------------------------------------------
# The runner's case


def run_case(loaded: Any, dataset: Any, params: dict[str, Any], mode: str) -> dict[str, Any]:
    """``activation_importance`` as the executor runs it: the function, then its files written."""
    from analyses.activation_importance import ActivationImportanceParams
    from runner.artifacts import RunFolder
    from runner.executor import seed_everything
    from runner.registry import ANALYSES
    from runner.step import StepContext

    resources = {"model": loaded, "dataset": dataset}
    ctx = StepContext(case_id=f"importance[{mode}]", seed=0, device="cpu", resources=resources.__getitem__)
    case_params = ActivationImportanceParams(**{**params, "aggregate_by": mode})
    seed_everything(0)
    started = time.perf_counter()
    output = ANALYSES.get("activation_importance").func(ctx, case_params)
    computed = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="importance-benchmark-") as folder:
        run_folder = RunFolder(Path(folder))
        run_folder.write_data(ctx.case_id, output.data)
        data_written = time.perf_counter()
        run_folder.write_plots(ctx.case_id, output.plots)
        plots_written = time.perf_counter()
    timing = output.data["timing_stats.json"]
    return {
        "analysis_seconds": computed - started,
        # the analysis' own clock stops before the summary, data files and figures are built
        "compute_seconds": timing["total_seconds"],
        "figures_seconds": computed - started - timing["total_seconds"],
        "batch_loop_seconds": float(sum(timing["batch_seconds"])),
        "forward_seconds": timing["forward_seconds"],
        "backward_seconds": timing["backward_seconds"],
        "data_files_seconds": data_written - computed,
        "plots_seconds": plots_written - data_written,
        "n_plots": len(output.plots),
        "seconds": plots_written - started,
        "arrays": dict(output.data["consolidated_results.npz"]),
        "normalization": case_params.normalization,
    }


# ----------------------------------------------------------------------------------------------
# Measuring and comparing


def measure_mode(
    mode: str, loaded: Any, floor_model: Any, dataset: Any, step: dict[str, Any], repeats: int
) -> dict[str, Any]:
    """Floor and runner ``repeats`` times each, in alternating order (floor first, then runner first);
    the best time of each is kept, and each repeat's pair gives a ratio measured under the same load."""
    floor_run = floor_values if mode == "values" else floor_gradients
    batch_size = step["params"]["batch_size"]
    floor_run(floor_model, dataset.tokens[:batch_size], batch_size)  # warm-up: the floor is a floor
    floors: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    results: dict[str, Any] = {}

    def floor() -> None:
        started = time.perf_counter()
        results["floor"] = floor_run(floor_model, dataset.tokens, batch_size)
        floors.append({"seconds": time.perf_counter() - started, "load_average": os.getloadavg()[0]})
        report(f"floor {mode}", floors[-1])

    def runner() -> None:
        results["case"] = run_case(loaded, dataset, step["params"], mode)
        runs.append({k: v for k, v in results["case"].items() if k != "arrays"})
        runs[-1]["load_average"] = os.getloadavg()[0]
        report(f"runner {mode}", runs[-1])

    for repeat in range(repeats):
        for measure in (floor, runner) if repeat % 2 == 0 else (runner, floor):
            measure()
    best_floor = min(f["seconds"] for f in floors)
    best = min(runs, key=lambda r: r["seconds"])
    paired = [r["seconds"] / f["seconds"] for f, r in zip(floors, runs, strict=True)]
    paired_compute = [r["compute_seconds"] / f["seconds"] for f, r in zip(floors, runs, strict=True)]
    return {
        "floor_seconds": best_floor,
        "runner": best,
        "ratio": best["seconds"] / best_floor,
        "compute_ratio": min(r["compute_seconds"] for r in runs) / best_floor,
        "paired_ratios": paired,
        "paired_compute_ratios": paired_compute,
        "floor_runs": floors,
        "runner_runs": runs,
        **compare(results["floor"], results["case"]["arrays"], results["case"]["normalization"]),
    }


def report(label: str, run: dict[str, Any]) -> None:
    extra = f" (analysis {run['analysis_seconds']:.1f} s)" if "analysis_seconds" in run else ""
    print(
        f"{label:>24}: {run['seconds']:8.2f} s{extra}  (load average {run['load_average']:.2f})",
        file=sys.stderr,
    )


def compare(
    floor: dict[int, tuple[np.ndarray, ...]], arrays: dict[str, np.ndarray], normalization: Any
) -> dict[str, Any]:
    """Largest |runner - floor| per layer and variant, relative to the largest |floor| of that layer."""
    from analyses._tensors import normalize

    worst, where = 0.0, ""
    for layer, (mean, mean_abs) in floor.items():
        for name, values in (("mean", mean), ("mean_abs", mean_abs)):
            expected, _ = normalize(values, normalization)
            actual = arrays[f"layer_{layer}_{name}"]
            relative = float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30))
            if relative > worst or not where:
                worst, where = relative, f"layer_{layer}_{name}"
    return {"max_relative_difference": worst, "worst_array": where, "layers_compared": len(floor)}


def matmul_rate(loaded: Any) -> float:
    """FLOP/s of a float32 matmul shaped like the model's MLP on a batch of tokens."""
    return shaped_matmul_rate(loaded.model.cfg.d_model, loaded.model.cfg.d_mlp)


# ----------------------------------------------------------------------------------------------
# Output


def summarize(
    step: dict[str, Any],
    dataset: Any,
    cases: dict[str, Any],
    loads: list[dict[str, Any]],
    rate: float,
    load_before: tuple[float, float, float],
    args: argparse.Namespace,
) -> dict[str, Any]:
    best_load = min(loads, key=lambda t: t["load_model"])
    return {
        "workload": {
            "model": step["model"],
            "dataset": step["dataset"],
            "passages": len(dataset),
            "max_len": dataset.max_len,
            "params": step["params"],
            "repeats": args.repeats,
        },
        "cases": cases,
        "cached_load": {
            "load_seconds": best_load["load_model"],
            "imports_seconds": imports_seconds(best_load),
            "best": best_load,
            "runs": loads,
        },
        "targets": {
            "ratio": TARGET_RATIO,
            "load_seconds": TARGET_LOAD_SECONDS,
            "quickstart_seconds": TARGET_QUICKSTART_SECONDS,
        },
        "tolerance": args.tolerance,
        "matmul_gflops": round(rate / 1e9, 1),
        "machine": {
            **machine(rate),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        },
        "date": datetime.now().isoformat(timespec="seconds"),
    }


def print_table(result: dict[str, Any]) -> None:
    w, machine = result["workload"], result["machine"]
    print(
        f"\nactivation_importance on {w['model']}, {w['dataset']}: {w['passages']} passages x "
        f"{w['max_len']} tokens, batch {w['params']['batch_size']}, "
        f"layers {w['params'].get('layers', 'all')}, best of {w['repeats']}"
    )
    print(
        f"{machine['cpu']}, {machine['cpus']} CPUs, {machine['torch_threads']} torch threads; "
        f"matmul {result['matmul_gflops']} GFLOP/s; load average {machine['load_average_before'][0]} "
        f"before, {machine['load_average_after'][0]} after\n"
    )
    header = ("", "floor", "compute", "ratio", "figures", "png", "data", "case", "ratio", "max rel |diff|")
    print(f"  {header[0]:<11}" + "".join(f"{h:>9}" for h in header[1:9]) + f"{header[9]:>16}")
    for mode, case in result["cases"].items():
        run = case["runner"]
        cells = (
            f"{case['floor_seconds']:.2f} s",
            f"{run['compute_seconds']:.2f} s",
            f"{case['compute_ratio']:.2f}x",
            f"{run['figures_seconds']:.2f} s",
            f"{run['plots_seconds']:.2f} s",
            f"{run['data_files_seconds']:.2f} s",
            f"{run['seconds']:.2f} s",
            f"{case['ratio']:.2f}x",
        )
        difference = f"{case['max_relative_difference']:>16.2g}"
        print(f"  {mode:<11}" + "".join(f"{c:>9}" for c in cells) + difference)
    print(
        "  (compute: the analysis' own clock, batches and reductions; figures: building its plots; png: "
        "writing them; case: all of it, as the console times a case)"
    )
    for mode, case in result["cases"].items():
        pairs = ", ".join(
            f"{c:.2f}x/{t:.2f}x"
            for c, t in zip(case["paired_compute_ratios"], case["paired_ratios"], strict=True)
        )
        print(f"  {mode}: compute/case ratio of each repeat to the floor run next to it: {pairs}")
    load = result["cached_load"]
    best = load["best"]
    imports = ", ".join(
        f"{k.removeprefix('import_')} {v:.2f} s" for k, v in best.items() if k.startswith("import_")
    )
    print(
        f"\n  cached load: {load['load_seconds']:.2f} s after imports ({imports}); "
        f"best of {len(load['runs'])} fresh processes"
    )
    if "quickstart" in result:
        quick, target = result["quickstart"], result["targets"]["quickstart_seconds"]
        verdict = "yes" if quick["seconds"] <= target and quick["exit_status"] == 0 else "NO"
        print(
            f"  quickstart: {quick['seconds']:.1f} s wall (exit status {quick['exit_status']}); "
            f"under {target:.0f} s: {verdict}"
        )
    ok_ratio = all(c["ratio"] <= result["targets"]["ratio"] for c in result["cases"].values())
    ok_compute = all(c["compute_ratio"] <= result["targets"]["ratio"] for c in result["cases"].values())
    ok_load = load["load_seconds"] <= result["targets"]["load_seconds"]
    worst = max(c["max_relative_difference"] for c in result["cases"].values())
    print(
        f"  targets: cases within {result['targets']['ratio']}x their floor: {'yes' if ok_ratio else 'NO'} "
        f"(compute alone: {'yes' if ok_compute else 'NO'}); "
        f"load under {result['targets']['load_seconds']:.0f} s: {'yes' if ok_load else 'NO'}"
    )
    verdict = "ok" if worst <= result["tolerance"] else "TOO LARGE"
    print(
        f"  largest relative difference from the floor: {worst:.3g} "
        f"({verdict}; tolerance {result['tolerance']})"
    )


def write(result: dict[str, Any], output: str | None) -> None:
    print(f"\nwrote {write_json(result, 'importance', output)}")


if __name__ == "__main__":
    sys.exit(main())
