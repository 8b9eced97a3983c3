"""Benchmark: what the result cache saves on a spec (default: the quickstart).

In a scratch cache and output folder: one run that computes every case (cold), then, each in a
fresh process as a user pays it, ``runner plan`` and a fully cached ``runner run`` (median and
fastest of ``--repeats``), and a resume: a run SIGKILLed once its first case is stored, then run
again (which computes only the rest). Targets: a cached run under 5 s, ``plan`` under 2 s, the
resume within the remaining cases' time plus 5 s.

    python benchmarks/cache.py [--spec specs/quickstart.yaml] [--repeats 5] [--output out.json]
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="specs/quickstart.yaml")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output")
    options = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="runner-cache-bench-"))
    cache, runs = scratch / "cache", scratch / "runs"
    env = {**os.environ, "RUNNER_RESULTS_CACHE": str(cache)}
    run = ["run", options.spec, "--output-dir", str(runs), "-q"]
    result: dict[str, Any] = {"spec": options.spec, "machine": machine()}
    result["cold_run_s"] = timed(run, env)
    for name, args in (("plan", ["plan", options.spec]), ("cached_run", run)):
        times = [timed(args, env) for _ in range(options.repeats)]
        result[f"{name}_s"] = {"median": statistics.median(times), "fastest": min(times)}
    kill_cache = scratch / "kill-cache"
    kill_env = {**env, "RUNNER_RESULTS_CACHE": str(kill_cache)}
    result["killed_after_s"] = killed_after_first_case(run, kill_env, kill_cache)
    result["resume_s"] = timed(run, kill_env)
    print(describe(result["machine"]))
    print(f"{options.spec}: cold run {result['cold_run_s']:.1f} s")
    for name in ("plan", "cached_run"):
        seconds = result[f"{name}_s"]
        print(f"  {name}: median {seconds['median']:.2f} s, fastest {seconds['fastest']:.2f} s")
    killed, resumed = result["killed_after_s"], result["resume_s"]
    print(f"  killed after its first case at {killed:.1f} s; resumed in {resumed:.1f} s")
    print(f"written {write_json(result, 'cache', options.output)}")


if __name__ == "__main__":
    main()
