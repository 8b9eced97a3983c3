"""`runner validate`, `schema`, `list`, `show` on real bad inputs: located errors, exit 2, no traceback."""

from __future__ import annotations

import json
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
    assert set(schema["$defs"][ref]["properties"]) == {"value", "n", "fail", "interrupt", "sleep"}
    assert schema["$defs"][ref]["additionalProperties"] is False


def test_schema_validates_the_committed_specs(run_cli):
    jsonschema = pytest.importorskip("jsonschema")
    import yaml

    _, out, _ = run_cli("schema")
    schema = json.loads(out)
    specs = Path(__file__).resolve().parents[2] / "specs"
    for path in sorted(specs.glob("*.yaml")):
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)


def test_list_and_show_describe_analyses(run_cli):
    code, out, _ = run_cli("list")
    assert code == 0 and "toy" in out and "Echo a value" in out
    code, out, _ = run_cli("show", "toy")
    assert code == 0
    assert "value" in out and "A number echoed into the summary." in out and "1.0" in out


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
