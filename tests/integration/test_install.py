"""runner installed as a tool: a wheel, installed into a fresh virtual environment outside the
repository, runs a spec from another folder to a rendered ``report.html``.

The fresh environment borrows the test environment's dependencies (torch, transformers, ...) through
a ``.pth`` file instead of installing them again, which would take minutes; runner itself comes only
from the wheel. The test checks that it does: ``runner.__file__`` must lie in the fresh
environment, and nothing of the repository may be on its path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``bin/`` folder of a fresh venv with runner installed from a freshly built wheel."""
    build = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            str(REPO),
            "-w",
            build,
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = build.glob("runner-*.whl")
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    bin_dir = venv / "bin"
    site = Path(
        subprocess.run(
            [bin_dir / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    # The test environment's packages, after the fresh one's own: torch and friends, not runner
    # (an editable install of runner is a finder hook in a .pth file there, which is not run
    # for a directory added this way).
    (site / "borrowed-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", bin_dir / "python", "install", "--no-deps", "-q", wheel],
        check=True,
        capture_output=True,
    )
    return bin_dir


def run_in(folder: Path, bin_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(
        [bin_dir / "runner", *args], cwd=folder, env=env, capture_output=True, text=True, timeout=600
    )


def test_runner_comes_from_the_wheel_not_the_repository(installed: Path, tmp_path: Path) -> None:
    code = (
        "import json, runner, analyses, templates\n"
        "print(json.dumps([runner.__file__, analyses.__file__, templates.__file__]))"
    )
    done = subprocess.run([installed / "python", "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for location in json.loads(done.stdout):
        assert Path(location).is_relative_to(installed.parent), location


def test_a_spec_in_another_folder_runs_to_a_rendered_html_report(
    installed: Path, tmp_path: Path, tiny_llama_dir: Path
) -> None:
    project = tmp_path / "my-project"
    (project / "specs").mkdir(parents=True)
    (project / "data.txt").write_text(" ".join(["The quick brown fox jumps over the lazy dog."] * 200))
    (project / "specs" / "tiny.yaml").write_text(
        textwrap.dedent(
            f"""\
            name: tiny
            model: {{name: {tiny_llama_dir}, device: cpu}}
            dataset: {{name: ../data.txt, max_passages: 4, max_len: 16}}
            steps:
              - id: importance
                analysis: activation_importance
                params: {{batch_size: 2}}
            expectations:
              - step: importance
                that: n_tokens >= 60
            """
        )
    )
    done = run_in(project, installed, "run", "specs/tiny.yaml", "--output-dir", "out")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout
    (run_dir,) = (project / "out" / "tiny").iterdir()
    html = (run_dir / "report.html").read_text()
    assert "activation_importance" in html and "data:image/png;base64," in html
    assert f"report: {run_dir.relative_to(project) / 'report.html'}" in done.stdout.replace("\\", "/")
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "passed"


def test_the_shipped_sae_is_found_by_name_from_any_folder(installed: Path, tmp_path: Path) -> None:
    (tmp_path / "sae.yaml").write_text(
        textwrap.dedent(
            """\
            name: shipped-sae
            steps:
              - id: edit
                analysis: sae_interventions
                params:
                  sae: {name: smollm2-135m/blocks.12.hook_resid_post}
                  features: [1, 2]
              - id: typo
                analysis: sae_interventions
                params:
                  sae: {name: smollm2-135m/blocks.12.hook_resid_pots}
                  features: [1, 2]
            """
        )
    )
    done = run_in(tmp_path, installed, "validate", "sae.yaml")
    assert done.returncode == 2
    assert "sae.yaml:11:" in done.stdout and "steps[1].params.sae" in done.stdout
    assert "Did you mean 'smollm2-135m/blocks.12.hook_resid_post'?" in done.stdout
    assert "steps[0]" not in done.stdout
