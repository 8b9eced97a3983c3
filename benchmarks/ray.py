"""Benchmark: the Ray executor against the local one, in one process.

1. Per-case overhead: a spec of ``--small`` and ``--many`` cases of a no-op analysis (no model, one
   tiny data file), run with ``--no-cache`` by the local executor and by ``--executor ray`` on a local
   Ray instance that runner starts (and stops) itself. Per case: the slope between the two sizes;
   fixed: what is left at the small size (Ray: starting the instance and its workers).
2. The quickstart (``specs/quickstart.yaml``, the embedded model) with ``--no-cache``: local (one
   process, every core as torch threads), on one Ray worker (a local instance of 1 CPU) and on two
   (2 CPUs: its two cases side by side, one torch thread each).

Prints a table with the CPU model, its matmul rate and the load average, and writes JSON.

    python benchmarks/ray.py [--small 10] [--many 400] [--skip-quickstart] [--output out.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

HERE = Path(__file__).resolve().parent
# This file is named ray.py: its folder must not be on sys.path, or `import ray` would import it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

MODULE = "runner_ray_benchmark"
"""The name this file is imported under, by this process and by the Ray workers (from its path)."""


class NoopParams(BaseModel):
    """Parameters of the no-op analysis."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    value: float = 0.0
    """Echoed into the result."""


def _register() -> None:
    from runner.registry import ANALYSES, analysis
    from runner.results import StepResult
    from runner.step import StepOutput

    class NoopResult(StepResult):
        value: float

    def noop(ctx: Any, params: NoopParams) -> StepOutput:
        """Return the value and one small CSV: what every case costs besides its own work."""
        return StepOutput(result=NoopResult(value=params.value), data={"row.csv": [{"value": params.value}]})

    if "bench_noop" not in ANALYSES:
        analysis("bench_noop", params=NoopParams, result=NoopResult, needs=())(noop)


if __name__ == MODULE:  # imported by name: in this process and on every Ray worker
    _register()


def _load_machine() -> Any:
    spec = importlib.util.spec_from_file_location("_machine", HERE / "_machine.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _import_self() -> None:
    spec = importlib.util.spec_from_file_location(MODULE, __file__)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE] = module
    spec.loader.exec_module(module)


def run_cli(args: list[str]) -> float:
    """Wall seconds of ``runner ARGS`` in this process (it must end with 0 or 1)."""
    from runner.cli import main

    started = time.perf_counter()
    code = main([*args, "-q"])
    seconds = time.perf_counter() - started
    if code not in (0, 1):
        raise SystemExit(f"runner {' '.join(args)} exited {code}")
    return seconds


def noop_spec(folder: Path, n: int) -> Path:
    values = ", ".join(str(float(i)) for i in range(n))
    path = folder / f"noop-{n}.yaml"
    path.write_text(
        f"name: noop-{n}\nsteps:\n  - id: noop\n    analysis: bench_noop\n"
        f"    sweep:\n      product:\n        value: [{values}]\n"
    )
    return path


def overhead(small: int, many: int, scratch: Path) -> dict[str, Any]:
    """Seconds per case and fixed seconds of each executor, from runs of ``small`` and ``many`` cases."""
    out = scratch / "runs"
    run_cli(
        ["run", str(noop_spec(scratch, small)), "--no-cache", "--output-dir", str(out)]
    )  # warm-up: imports
    found: dict[str, Any] = {}
    for executor in ("local", "ray"):
        times = {}
        for n in (small, many):
            times[n] = run_cli(
                [
                    "run",
                    str(noop_spec(scratch, n)),
                    "--no-cache",
                    "--output-dir",
                    str(out),
                    "--executor",
                    executor,
                ]
            )
        per_case = (times[many] - times[small]) / (many - small)
        found[executor] = {
            "seconds": times,
            "per_case_s": per_case,
            "fixed_s": times[small] - small * per_case,
            "load_average": os.getloadavg()[0],
        }
    return found


def quickstart(scratch: Path) -> dict[str, Any]:
    """The quickstart with --no-cache: local, on one Ray worker, and on two."""
    import ray

    args = ["run", str(HERE.parent / "specs" / "quickstart.yaml"), "--no-cache", "--output-dir", str(scratch)]
    found: dict[str, Any] = {"local": {"seconds": run_cli(args), "load_average": os.getloadavg()[0]}}
    for workers in (1, 2):
        ray.init(num_cpus=workers, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
        try:
            seconds = run_cli([*args, "--executor", "ray"])
        finally:
            ray.shutdown()
        found[f"ray, {workers} worker{'s' if workers > 1 else ''}"] = {
            "seconds": seconds,
            "load_average": os.getloadavg()[0],
        }
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--small", type=int, default=10)
    parser.add_argument("--many", type=int, default=400)
    parser.add_argument("--skip-quickstart", action="store_true")
    parser.add_argument("--output")
    args = parser.parse_args()
    machine = _load_machine()
    _import_self()
    facts = machine.machine()
    print(machine.describe(facts))
    with tempfile.TemporaryDirectory(prefix="runner-ray-bench-") as folder:
        scratch = Path(folder)
        os.environ["RUNNER_RESULTS_CACHE"] = str(scratch / "cache")  # --no-cache anyway; never the user's
        result: dict[str, Any] = {"machine": facts, "overhead": overhead(args.small, args.many, scratch)}
        if not args.skip_quickstart:
            result["quickstart"] = quickstart(scratch)
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(f"\nper-case overhead ({args.small} and {args.many} no-op cases, --no-cache):")
    print(f"{'executor':<10} {'per case':>10} {'fixed':>8}   load")
    for executor, found in result["overhead"].items():
        per_case, fixed, load = found["per_case_s"], found["fixed_s"], found["load_average"]
        print(f"{executor:<10} {per_case:>9.3f}s {fixed:>7.1f}s   {load:.2f}")
    if "quickstart" in result:
        print("\nquickstart (--no-cache):")
        for name, found in result["quickstart"].items():
            print(f"{name:<16} {found['seconds']:>7.1f}s   load {found['load_average']:.2f}")
    print(f"\nwrote {machine.write_json(result, 'ray', args.output)}")


if __name__ == "__main__":
    main()
