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
