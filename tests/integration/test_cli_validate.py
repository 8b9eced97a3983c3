"""`runner validate`, `schema`, `list`, `show` on real bad inputs: located errors, exit 2, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

GOOD = """
name: good
steps:
  - id: toy
    analysis: toy
    params: {value: 2.0}
"""


def test_valid_spec_passes(write_spec, run_cli):
    code, out, _ = run_cli("validate", write_spec(GOOD))
    assert code == 0
    assert "1 valid, 0 invalid" in out


def test_misspelt_key_names_file_line_field_and_suggestion(write_spec, run_cli):
    path = write_spec("""
        name: typo
        modle:
          name: smollm2-135m
        steps:
          - id: toy
            analysis: toy
    """)
    code, out, _ = run_cli("validate", path)
    assert code == 2
    assert f"{path}:2:1: modle: unknown field. Did you mean 'model'?" in out


def test_misspelt_param_is_located_inside_params(write_spec, run_cli):
    path = write_spec("""
        name: typo
        steps:
          - id: toy
            analysis: toy
            params:
              valeu: 2.0
    """)
    code, out, _ = run_cli("validate", path)
    assert code == 2
    assert f"{path}:6:7: steps[0].params.valeu: unknown field. Did you mean 'value'?" in out


def test_unknown_analysis_suggests_close_names(write_spec, run_cli):
    path = write_spec(GOOD.replace("analysis: toy", "analysis: toyy"))
    code, out, _ = run_cli("validate", path)
    assert code == 2
    assert f"{path}:4:15: steps[0].analysis: Unknown analysis 'toyy'. Did you mean 'toy'?" in out
    assert "Available:" in out


def test_every_error_in_a_file_is_reported_at_once(write_spec, run_cli):
    path = write_spec("""
        name: many
        seed: abc
        model: {device: gpu}
        steps:
          - id: toy
            analysis: toy
            params: {n: many}
    """)
    code, out, _ = run_cli("validate", path)
    assert code == 2
    assert f"{path}:2:7: seed:" in out
    assert f"{path}:3:17: model.device: Input should be 'auto', 'cpu' or 'cuda' (got 'gpu')" in out
    assert f"{path}:7:17: steps[0].params.n: Input should be a valid integer" in out
    assert "1 invalid" in out


def test_bad_param_value_is_located(write_spec, run_cli):
    path = write_spec(GOOD.replace("value: 2.0", "n: many"))
    code, out, _ = run_cli("validate", path)
    assert code == 2
    assert f"{path}:5:17: steps[0].params.n: Input should be a valid integer" in out


def test_bad_sweep_value_points_at_the_sweep_entry(write_spec, run_cli):
    path = write_spec("""
        name: sweep
        steps:
          - id: toy
            analysis: toy
            sweep:
              product:
                n: [1, two]
    """)
    code, out, _ = run_cli("validate", path)
    assert code == 2
    assert f"{path}:7:16: steps[0].params.n: Input should be a valid integer" in out
    assert "(value from the sweep)" in out


def test_sweep_over_unknown_param_is_an_error(write_spec, run_cli):
    path = write_spec(GOOD + "    sweep:\n      product: {vlue: [1, 2]}\n")
    code, out, _ = run_cli("validate", path)
    assert code == 2
    assert "toy has no parameter 'vlue'. Did you mean 'value'?" in out


def test_duplicate_keys_are_errors(write_spec, run_cli):
    path = write_spec("""
        name: dup
        seed: 1
        seed: 2
        steps:
          - {id: toy, analysis: toy}
    """)
    code, out, _ = run_cli("validate", path)
    assert code == 2
    assert f"{path}:3:1: seed: duplicate key (first defined at line 2)" in out


def test_duplicate_step_ids_are_errors(write_spec, run_cli):
    path = write_spec("""
        name: dup
        steps:
          - {id: toy, analysis: toy}
          - {id: toy, analysis: toy}
    """)
    code, out, _ = run_cli("validate", path)
    assert code == 2
    assert f"{path}:4:10: steps[1].id: step id 'toy' is already used by steps[0]" in out


def test_python_tags_are_rejected_and_never_executed(write_spec, run_cli, tmp_path):
    marker = tmp_path / "pwned"
    path = write_spec(f"""
        name: evil
        description: !!python/object/apply:os.system ["touch {marker}"]
        steps:
          - {{id: toy, analysis: toy}}
    """)
    code, out, _ = run_cli("validate", path)
    assert code == 2
    assert f"{path}:2:14: description: the YAML tag !!python/object/apply:os.system is not allowed" in out
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", ":1:1: the file is empty"),
        (b"- a\n- b\n", ":1:1: a spec must be a YAML mapping, not a list"),
        (b"name: x\nsteps:\n\t- id: a\n", ":3:1: a tab character; YAML indentation must use spaces"),
        (b"\x7fELF\x02\x01\x01\x00\x00\x00", ": this is a binary file, not YAML text"),
        (b"name: [unclosed\n", ":2:1: invalid YAML"),
        (b"name: a\n---\nname: b\n", ":2:1: more than one YAML document"),
        (b"name: caf\xe9\n", ":1: not UTF-8 text"),
    ],
)
def test_malformed_files_get_clear_errors(tmp_path, run_cli, content, message):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    code, out, err = run_cli("validate", path)
    assert code == 2
    assert f"{path}{message}" in out
    assert "Traceback" not in out + err


ROOT = Path(__file__).resolve().parents[2]
"""The repository, put first on the subprocess's path so that it runs this checkout's `runner`."""

# The "billion laughs": 9 lines that stand for 9**9 (387 million) values once expanded.
LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{name}: &{name} [{', '.join([f'*{before}'] * 9)}]\n"
    for before, name in zip("abcdefgh", "bcdefghi", strict=True)
)


def test_alias_bomb_is_refused_at_its_alias_without_hanging(tmp_path):
    path = tmp_path / "laughs.yaml"
    path.write_text(LAUGHS)
    # A subprocess with a timeout: were the bound lost, this test would fail instead of hanging CI.
    result = subprocess.run(
        [sys.executable, "-m", "runner.cli", "validate", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])},
    )
    assert result.returncode == 2
    expected = f"{path}:6:8: f[0]: the alias *e expands so that the spec holds more than 100,000 values"
    assert expected in result.stdout.splitlines()
    assert "Write the values out, or use fewer aliases." in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"x: " + b"[" * 10_000 + b"]" * 10_000 + b"\n", ":1:103: values nest more than 100 levels deep"),
        (b"name: x\nx: &a [*a]\n", ":2:8: x[0]: the alias *a is inside its own anchor, so it never ends"),
        (b"name: x\nx: &a {y: *a}\n", ":2:11: x.y: the alias *a is inside its own anchor, so it never ends"),
        (b"seed: " + b"9" * 10_000 + b"\n", ":1:7: seed: a number 10,000 characters long"),
        (b"seed: 1.0e+999999\n", ":1:7: seed: Input should be a finite number (got inf)"),
        (b"seed: 1e999999\n", ":1:7: seed: Input should be a valid integer, unable to parse string"),
        (b"name: x\nseed: !!int abc\n", ":2:7: seed: cannot read 'abc' as an integer"),
        (b"name: 2024-13-45\n", ":1:7: name: cannot read '2024-13-45' as a date (month must be in 1..12)"),
        (b"name: x\nseed: " + b"y" * 60_000 + b"\n", ":2:7: seed: Input should be a valid integer"),
        (b"name: a\x01\n", ":1:8: a character that YAML does not allow (U+0001)"),
        (
            b"name: x\n" + b"k" * 60_000 + b": 1\n",
            ":2:60001: invalid YAML: could not find expected ':'",
        ),
        (b"name: x\n? " + b"k" * 60_000 + b"\n: 1\n", ":2:3: kkkkkkkkkk"),
        (b"name: a\n" + b"---\nname: b\n" * 5_000, ":2:1: more than one YAML document"),
        (b"name: *nope\n", ":1:7: invalid YAML: found undefined alias 'nope'"),
        (
            b"name: x\nsteps:\n  - <<: 3\n",
            ":3:9: steps[0]: a merge key (<<) takes a mapping or a list of mappings",
        ),
    ],
    ids=[
        "deep-nesting",
        "alias-in-own-list",
        "alias-in-own-mapping",
        "huge-integer",
        "infinite-float",
        "1e999999-is-text",
        "wrong-explicit-tag",
        "impossible-date",
        "long-value",
        "control-character",
        "long-key",
        "long-explicit-key",
        "many-documents",
        "undefined-alias",
        "merge-of-a-number",
    ],
)
def test_hostile_files_are_refused_with_a_location(tmp_path, run_cli, content, message):
    path = tmp_path / "hostile.yaml"
    path.write_bytes(content)
    code, out, err = run_cli("validate", path)
    assert code == 2
    assert f"{path}{message}" in out
    assert "Traceback" not in out + err
    assert max(map(len, out.splitlines())) < 1000  # long values are shortened, not echoed


def test_huge_file_is_refused_by_size_before_parsing(tmp_path, run_cli):
    path = tmp_path / "huge.yaml"
    path.write_bytes(b"name: x\n" + b"# padding\n" * 5_000_000)  # 50 MB
    code, out, _ = run_cli("validate", path)
    assert code == 2
    assert f"{path}: the file is larger than 64 KiB" in out.splitlines()
    assert "keep data (prompts, tables) in a file the spec names" in out


ALIASED = """
    name: aliases
    steps:
      - id: a
        analysis: toy
        params: &params {value: 2.0, n: 3}
      - id: b
        analysis: toy
        params: *params
      - id: c
        analysis: toy
        params: {<<: *params, n: 4}
"""


def test_ordinary_aliases_and_merge_keys_validate(write_spec, run_cli):
    code, out, _ = run_cli("validate", write_spec(ALIASED))
    assert code == 0
    assert "1 valid, 0 invalid" in out


def test_errors_through_aliases_point_at_the_anchored_text(write_spec, run_cli):
    path = write_spec(ALIASED.replace("n: 3", "n: many"))
    code, out, _ = run_cli("validate", path)
    assert code == 2
    for step in (0, 1):
        assert f"{path}:5:37: steps[{step}].params.n: Input should be a valid integer" in out
    assert "steps[2].params.n" not in out  # its own `n: 4` overrides the merged one


def test_bad_expectation_is_located(write_spec, run_cli):
    path = write_spec(
        GOOD
        + """expectations:
  - step: toy
    that: "__import__('os').system('x')"
  - step: tyo
    that: "value > 1"
"""
    )
    code, out, _ = run_cli("validate", path)
    assert code == 2
    assert f"{path}:8:11: expectations[0].that:" in out
    assert f"{path}:9:11: expectations[1].step: no step 'tyo'. Did you mean 'toy'?" in out


def test_directories_are_searched_recursively(tmp_path, run_cli):
    (tmp_path / "specs" / "sub").mkdir(parents=True)
    (tmp_path / "specs" / "a.yaml").write_text(GOOD)
    (tmp_path / "specs" / "sub" / "b.yml").write_text("name: [broken\n")
    code, out, _ = run_cli("validate")  # default: specs/
    assert code == 2
    assert "1 valid, 1 invalid" in out


def test_run_on_invalid_spec_exits_two_without_traceback(write_spec, run_cli, tmp_path):
    code, out, err = run_cli("run", write_spec(GOOD.replace("analysis: toy", "analysis: toyy")))
    assert code == 2
    assert "Unknown analysis 'toyy'" in err
    assert "Traceback" not in out + err
    assert not (tmp_path / "runs").exists()


def test_missing_spec_file_is_a_usage_error(run_cli, tmp_path):
    code, _, err = run_cli("run", tmp_path / "nope.yaml")
    assert code == 2
    assert "nope.yaml: cannot read file" in err


def test_schema_types_params_per_analysis(run_cli):
    code, out, _ = run_cli("schema")
    schema = json.loads(out)
    step = schema["$defs"]["StepSpec"]
    assert "toy" in step["properties"]["analysis"]["enum"]
    toy_branch = next(b for b in step["allOf"] if b["if"]["properties"]["analysis"]["const"] == "toy")
    ref = toy_branch["then"]["properties"]["params"]["$ref"].split("/")[-1]
    assert set(schema["$defs"][ref]["properties"]) == {"value", "n", "fail", "missing", "interrupt", "sleep"}
    assert schema["$defs"][ref]["additionalProperties"] is False


def test_schema_validates_the_committed_specs(run_cli):
    jsonschema = pytest.importorskip("jsonschema")
    import yaml

    _, out, _ = run_cli("schema")
    schema = json.loads(out)
    specs = Path(__file__).resolve().parents[2] / "specs"
    paths = sorted(specs.glob("*.yaml"))
    assert "quickstart.yaml" in {p.name for p in paths}
    for path in paths:
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)  # raises on a mismatch


def test_list_and_show_describe_analyses(run_cli):
    code, out, _ = run_cli("list")
    assert code == 0 and "toy" in out and "Echo a value" in out
    code, out, _ = run_cli("show", "toy")
    assert code == 0
    assert "value: float = 1.0" in out and "A number echoed into the summary." in out
    result = out.split("result (ToyResult: what expectations and later steps read)")[1]
    assert "squares: list[float]" in result
    assert "array: array\n    The squares again, as an array (stored in the result's NPZ)." in result


def test_show_unknown_analysis_suggests(run_cli):
    code, _, err = run_cli("show", "toyy")
    assert code == 2
    assert "Unknown analysis 'toyy'. Did you mean 'toy'?" in err


def test_unknown_analysis_is_reported_with_other_field_errors(write_spec, run_cli):
    path = write_spec(GOOD.replace("analysis: toy", "analysis: toyy") + "seed: abc\n")
    code, out, _ = run_cli("validate", path)
    assert code == 2
    assert f"{path}:4:15: steps[0].analysis: Unknown analysis 'toyy'" in out
    assert f"{path}:6:7: seed:" in out


def test_sweeps_that_multiply_past_the_case_limit_are_refused_before_expanding(tmp_path, run_cli):
    # 10 ** 7 = ten million cases: expanding them took minutes and gigabytes before being refused.
    keys = "".join(f"        {key}: [{', '.join(str(i) for i in range(10))}]\n" for key in "abcdefg")
    spec = tmp_path / "big.yaml"
    spec.write_text(f"name: big\nsteps:\n  - id: toy\n    analysis: toy\n    sweep:\n      product:\n{keys}")
    code, out, _ = run_cli("validate", spec)
    assert code == 2
    assert f"{spec}:5:5: steps[0].sweep: the sweeps expand into 10,000,000 cases, more than the 10,000" in out
