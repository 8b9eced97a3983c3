"""Benchmark: what the result cache saves on a spec (default: the quickstart).

In a scratch cache and output folder: one run that computes every case (cold), then, each in a
fresh process as a user pays it, ``runner plan`` and a fully cached ``runner run`` (median and
fastest of ``--repeats``), and ``--resumes`` resumes: a run SIGKILLed once its first case is stored,
then run again (which computes only the rest). Targets: a cached run under 5 s, ``plan`` under 2 s,
the resume within the remaining cases' time plus 5 s.

The resume's overhead is its wall time minus the time the cases it computes took in the
uninterrupted (cold) run, as each run's manifest records it (``duration_s``: the analysis and the
writing of its files, after the model and dataset are loaded). It holds everything the resumed
process pays that the cold run paid once for all cases: Python and the imports, the model and the
dataset, the first case's lazy imports and checks, the cached case, the report, the exit. Case
times of two processes differ by a few percent on an idle machine and by far more under load, so
the resumed run's own ``duration_s`` is shown too: wall minus that is the start-up outside its
cases, of which the TransformerLens import and the model load are shown apart (from the manifest)
and ``import torch`` is timed in a fresh process.

    python benchmarks/cache.py [--spec specs/quickstart.yaml] [--repeats 5] [--resumes 1] [--output out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _machine import ROOT, describe, machine, write_json


def timed(args: list[str], env: dict[str, str]) -> float:
    """Wall seconds of ``runner ARGS`` in a fresh process (which must succeed)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "runner.cli", *args], cwd=ROOT, env=env, capture_output=True)
    if done.returncode not in (0, 1):
        raise SystemExit(
            f"runner {' '.join(args)} exited {done.returncode}:\n{done.stdout.decode()}{done.stderr.decode()}"
        )
    return time.perf_counter() - start


def killed_after_first_case(args: list[str], env: dict[str, str], cache: Path) -> float:
    """Start ``runner ARGS``, SIGKILL it as soon as one cache entry is stored; returns its seconds."""
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "runner.cli", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while not list((cache / "entries").glob("*/*")) and process.poll() is None:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    return time.perf_counter() - start


def newest_manifest(runs: Path) -> dict[str, Any]:
    """The manifest of the newest run folder under ``runs``."""
    newest = max(runs.glob("*/*/manifest.json"), key=lambda path: path.stat().st_mtime)
    return dict(json.loads(newest.read_text()))


def computed_seconds(manifest: dict[str, Any], cases: list[str] | None = None) -> dict[str, float]:
    """``duration_s`` of each case the run computed (of ``cases``, when given)."""
    return {
        case: float(record["duration_s"])
        for case, record in manifest["cases"].items()
        if record["cache"].get("state") != "cached" and (cases is None or case in cases)
    }


def measure_resume(
    run: list[str], env: dict[str, str], cache: Path, runs: Path, cold: dict[str, float]
) -> dict[str, Any]:
    """Kill a run after its first case, resume it; the resume's wall time, its cases and its overhead."""
    killed = killed_after_first_case(run, {**env, "RUNNER_RESULTS_CACHE": str(cache)}, cache)
    load = os.getloadavg()[0]
    wall = timed(run, {**env, "RUNNER_RESULTS_CACHE": str(cache)})
    manifest = newest_manifest(runs)
    resumed = computed_seconds(manifest)
    in_cold = sum(cold[case] for case in resumed)
    models = manifest["resources"]["models"].values()
    return {
        "killed_after_s": killed,
        "wall_s": wall,
        "computed": resumed,
        "computed_in_cold_run_s": in_cold,
        "overhead_s": wall - in_cold,
        "outside_cases_s": wall - sum(resumed.values()),
        # Parts of it the manifest records: importing TransformerLens (with transformers), loading the model.
        "transformer_lens_import_s": sum(float(m.get("import_seconds", 0.0)) for m in models),
        "model_load_s": sum(float(m.get("load_seconds", 0.0)) for m in models),
        "load_average_before": round(load, 2),
    }


def torch_import_seconds(repeats: int = 3) -> float:
    """Median seconds of ``import torch`` in a fresh process: the part of the start-up the manifest
    does not record (runner imports torch before any model is loaded)."""
    code = "import time; t = time.perf_counter(); import torch; print(time.perf_counter() - t)"
    times = [
        float(subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, text=True).stdout)
        for _ in range(repeats)
    ]
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="specs/quickstart.yaml")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--resumes", type=int, default=1)
    parser.add_argument("--output")
    options = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="runner-cache-bench-"))
    cache, runs = scratch / "cache", scratch / "runs"
    env = {**os.environ, "RUNNER_RESULTS_CACHE": str(cache)}
    run = ["run", options.spec, "--output-dir", str(runs), "-q"]
    result: dict[str, Any] = {"spec": options.spec, "machine": machine()}
    result["cold_run_s"] = timed(run, env)
    cold = computed_seconds(newest_manifest(runs))
    result["cold_cases_s"] = cold
    for name, args in (("plan", ["plan", options.spec]), ("cached_run", run)):
        times = [timed(args, env) for _ in range(options.repeats)]
        result[f"{name}_s"] = {"median": statistics.median(times), "fastest": min(times)}
    result["resumes"] = [
        measure_resume(run, env, scratch / f"kill-cache-{i}", runs, cold) for i in range(options.resumes)
    ]
    result["torch_import_s"] = torch_import_seconds()
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(describe(result["machine"]))
    print(f"{options.spec}: cold run {result['cold_run_s']:.1f} s; its cases " + _seconds(cold))
    for name in ("plan", "cached_run"):
        seconds = result[f"{name}_s"]
        print(f"  {name}: median {seconds['median']:.2f} s, fastest {seconds['fastest']:.2f} s")
    for resume in result["resumes"]:
        print(
            f"  killed after its first case at {resume['killed_after_s']:.1f} s; resumed in "
            f"{resume['wall_s']:.1f} s (load {resume['load_average_before']}), computing "
            f"{_seconds(resume['computed'])} ({resume['computed_in_cold_run_s']:.1f} s in the cold run): "
            f"overhead {resume['overhead_s']:.1f} s (target < 5 s); "
            f"outside its cases {resume['outside_cases_s']:.1f} s (TransformerLens import "
            f"{resume['transformer_lens_import_s']:.1f} s, model load {resume['model_load_s']:.1f} s)"
        )
    print(f"  import torch in a fresh process: {result['torch_import_s']:.2f} s (median of 3)")
    print(f"load average after: {result['load_average_after']}")
    print(f"written {write_json(result, 'cache', options.output)}")


def _seconds(cases: dict[str, float]) -> str:
    return ", ".join(f"{case} {seconds:.1f} s" for case, seconds in cases.items())


if __name__ == "__main__":
    main()
