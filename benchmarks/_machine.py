"""What every benchmark prints next to its figures: the CPU, its matmul rate, the load, versions.

Machines here change from day to day (an Intel Xeon, an AMD EPYC at half its matmul rate), so a
figure without them cannot be compared with another.
"""

from __future__ import annotations

import json
import os
import platform
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    """The CPU's model name, as the run manifest records it (``runner.manifest.cpu_model``)."""
    from runner.manifest import cpu_model as recorded

    return recorded() or platform.machine()


def matmul_rate(d_model: int = 576, d_mlp: int = 1536, repeats: int = 5) -> float:
    """FLOP/s of a float32 ``(2048, d_model) @ (d_model, d_mlp)`` matmul with torch (best of ``repeats``).

    The default shape is SmolLM2-135M's MLP on a batch of tokens.
    """
    import torch

    a, b = torch.randn(2048, d_model), torch.randn(d_model, d_mlp)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(10):
            torch.matmul(a, b)
        best = min(best, (time.perf_counter() - started) / 10)
    return 2 * a.shape[0] * d_model * d_mlp / best


def machine(rate: float | None = None) -> dict[str, Any]:
    """CPU model, matmul GFLOP/s (measured now unless given), cores, threads, load and versions."""
    import torch

    return {
        "cpu": cpu_model(),
        "matmul_gflops": round((rate if rate is not None else matmul_rate()) / 1e9, 1),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def describe(facts: dict[str, Any]) -> str:
    """One line for a table's header: ``AMD EPYC, 2 CPUs, 2 torch threads; matmul 183 GFLOP/s; ...``."""
    return (
        f"{facts['cpu']}, {facts['cpus']} CPUs, {facts['torch_threads']} torch threads; "
        f"matmul {facts['matmul_gflops']} GFLOP/s; load average {facts['load_average'][0]}"
    )


def write_json(result: dict[str, Any], name: str, output: str | None) -> Path:
    """Write ``result`` to ``output`` or ``runs/benchmarks/<name>-<time>.json``; returns the path."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(output) if output else ROOT / "runs" / "benchmarks" / f"{name}-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return path
