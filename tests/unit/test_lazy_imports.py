"""Commands that only read specs import no heavy library: editors and pre-commit hooks call them on every
save. Each check runs in a fresh interpreter, since this test process has long imported torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformer_lens", "transformers", "sae_lens", "matplotlib", "pandas", "numpy")


def heavy_modules_after(code: str) -> list[str]:
    """The heavy libraries imported by running ``code`` in a fresh interpreter from the repository."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize(
    "command",
    [
        ["validate", "specs/"],
        ["plan", "specs/quickstart.yaml"],
        ["plan", "specs/gpt2_interventions.yaml"],
        ["list"],
        ["show", "sae_interventions"],
        ["schema"],
    ],
    ids=" ".join,
)
def test_commands_that_read_specs_import_no_heavy_library(command: list[str]) -> None:
    code = f"from runner.cli import main\nassert main({command!r}) == 0"
    assert heavy_modules_after(code) == []


def test_a_spec_with_errors_is_reported_without_importing_torch(tmp_path: Path) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(
        "name: bad\nsteps:\n  - id: x\n    analysis: super_weights\n    params: {spike_threshold: -1}\n"
    )
    code = f"from runner.cli import main\nassert main(['validate', {str(spec)!r}]) == 2"
    assert heavy_modules_after(code) == []


def test_every_analysis_declaration_imports_no_heavy_library() -> None:
    code = "from runner.registry import load_analyses\nassert len(load_analyses()) >= 7"
    assert heavy_modules_after(code) == []


def test_running_a_case_imports_its_computing_module() -> None:
    code = (
        "import sys\nfrom runner.registry import load_analyses\nload_analyses()\n"
        "assert 'analyses.super_weights.compute' not in sys.modules\n"
        "from analyses.super_weights import super_weights\n"
        "try:\n    super_weights(None, None)\nexcept Exception:\n    pass\n"
        "assert 'analyses.super_weights.compute' in sys.modules"
    )
    assert "torch" in heavy_modules_after(code)


def test_a_heavy_import_runs_without_collections_and_its_objects_are_frozen(tmp_path: Path) -> None:
    # A module whose body allocates many containers and counts the collections that happen meanwhile.
    (tmp_path / "allocating.py").write_text(
        "import gc, __main__\n"
        "before = len(__main__.collections)\n"
        "kept = [[i] for i in range(20_000)]\n"
        "during = len(__main__.collections) - before\n"
        "enabled = gc.isenabled()\n"
    )
    code = f"""
import atexit, gc, sys
sys.path.insert(0, {str(tmp_path)!r})
atexit.register(lambda: print("frozen at exit", gc.get_freeze_count(), "tracked", len(gc.get_objects())))
from runner.models.imports import import_heavy
collections = []
gc.callbacks.append(lambda phase, info: collections.append(phase) if phase == "start" else None)
gc.set_threshold(10)  # with the collector on, a collection every few allocations
module, seconds = import_heavy("allocating")
assert module is sys.modules["allocating"] and seconds > 0
assert (module.during, module.enabled) == (0, False) and gc.isenabled()
frozen = gc.get_freeze_count()
assert frozen > 20_000, frozen
assert import_heavy("allocating") == (module, 0.0) and gc.get_freeze_count() == frozen
print("frozen after import", frozen)
later = [[i] for i in range(5_000)]  # tracked objects made after the import, alive at exit
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    after_import, at_exit = done.stdout.splitlines()
    frozen = int(after_import.split()[-1])
    # At exit everything still tracked was frozen too, so the interpreter's last collections skip it.
    assert int(at_exit.split()[3]) > frozen + 4_000 and int(at_exit.split()[-1]) < 100, at_exit


def test_without_the_pause_the_same_module_is_collected_during_its_import(tmp_path: Path) -> None:
    """The control for the test above: the probe module does see collections when imported plainly."""
    (tmp_path / "allocating.py").write_text(
        "import __main__\nbefore = len(__main__.collections)\nkept = [[i] for i in range(20_000)]\n"
        "during = len(__main__.collections) - before\n"
    )
    code = f"""
import gc, sys
sys.path.insert(0, {str(tmp_path)!r})
collections = []
gc.callbacks.append(lambda phase, info: collections.append(phase) if phase == "start" else None)
gc.set_threshold(10)
import allocating
print(allocating.during)
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) > 100
