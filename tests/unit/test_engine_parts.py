"""Small engine pieces: index syntax, registry checks, writers, number formatting."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import BaseModel, ConfigDict

from runner.artifacts import RunFolder
from runner.errors import RunnerError
from runner.params import parse_indices
from runner.registry import Registry, analysis
from runner.reports import environment, fmt
from runner.results import StepResult, to_jsonable


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0-3", (0, 1, 2, 3)),
        ("0,5,10", (0, 5, 10)),
        ("0-2,7-8", (0, 1, 2, 7, 8)),
        (4, (4,)),
        ([1, "3-4"], (1, 3, 4)),
        (" 2 - 3 , 1 ", (2, 3, 1)),
        ("1,1,0-1", (1, 0)),
    ],
)
def test_indices_read_the_seed_range_syntax(text, expected):
    assert parse_indices(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("5-2", "runs backwards"),
        ("a-b", "cannot read 'a-b'"),
        (-1, ">= 0"),
        (True, "boolean"),
        ("", "cannot read"),
    ],
)
def test_bad_indices_say_which_part_is_wrong(text, message):
    with pytest.raises(ValueError, match=message):
        parse_indices(text)


def test_registry_duplicate_names_name_both_definitions():
    registry: Registry[int] = Registry("thing")
    registry.add("a", 1, "mod.first")
    with pytest.raises(RunnerError, match=r"defined by mod\.first and by mod\.second"):
        registry.add("a", 2, "mod.second")


def test_registry_unknown_name_lists_available():
    registry: Registry[int] = Registry("thing")
    registry.add("alpha", 1, "x")
    registry.add("beta", 2, "y")
    with pytest.raises(
        RunnerError, match=r"Unknown thing 'alpah'\. Did you mean 'alpha'\? Available: alpha, beta"
    ):
        registry.get("alpah")


class LooseParams(BaseModel):
    x: int = 1


def test_analysis_with_loose_params_fails_at_decoration_naming_the_definition():
    def bad(ctx, params):
        """Doc."""

    with pytest.raises(RunnerError, match=r"Analysis 'bad' defined at .*bad is malformed: .*extra='forbid'"):
        analysis("bad", params=LooseParams, result=StepResult)(bad)


def test_analysis_with_wrong_signature_fails_at_decoration():
    class P(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)

    def wrong(model, params):
        """Doc."""

    with pytest.raises(RunnerError, match=r"signature must be \(ctx, params\)"):
        analysis("wrong", params=P, result=StepResult)(wrong)


def test_analysis_whose_result_is_no_step_result_fails_at_decoration():
    class P(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)

    def plain(ctx, params):
        """Doc."""

    with pytest.raises(RunnerError, match=r"result= must be a runner\.results\.StepResult subclass"):
        analysis("plain", params=P, result=dict)(plain)  # type: ignore[arg-type]


def test_analysis_that_needs_saes_must_take_an_sae_param():
    class P(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)

    def edit(ctx, params):
        """Doc."""

    with pytest.raises(RunnerError, match=r"needs 'saes' but its params have no `sae` field"):
        analysis("edit", params=P, result=StepResult, needs=("model", "saes"))(edit)


def test_npz_refuses_object_arrays(tmp_path):
    folder = RunFolder(tmp_path)
    with pytest.raises(RunnerError, match="never hold pickles"):
        folder.write_data("case", {"x.npz": {"meta": np.array([{"a": 1}], dtype=object)}})


def test_unknown_data_extension_is_an_error(tmp_path):
    with pytest.raises(RunnerError, match=r"No writer for data file 'x\.xlsx'"):
        RunFolder(tmp_path).write_data("case", {"x.xlsx": []})


def test_writes_leave_no_temporary_files(tmp_path):
    folder = RunFolder(tmp_path)
    folder.write_data(
        "c[a=1]", {"t.csv": [{"a": 1}], "t.json": {"b": np.float32(2.5)}, "a.npy": np.arange(3)}
    )
    files = sorted(p.name for p in (tmp_path / "data" / "c[a=1]").iterdir())
    assert files == ["a.npy", "t.csv", "t.json"]
    assert np.load(tmp_path / "data" / "c[a=1]" / "a.npy", allow_pickle=False).tolist() == [0, 1, 2]


def test_jsonable_handles_numpy_and_non_finite():
    value = {1: np.int64(3), "a": (np.float64(0.5), float("nan")), "arr": np.eye(2)}
    assert to_jsonable(value) == {"1": 3, "a": [0.5, "nan"], "arr": [[1.0, 0.0], [0.0, 1.0]]}


@pytest.mark.parametrize(
    ("value", "digits", "text"),
    [
        (3.14159265, 4, "3.142"),
        (1234567.0, 4, "1.235e+06"),
        (0.000123, 4, "1.230e-04"),
        (12, 4, "12"),
        (None, 4, "–"),
        (2.5, 2, "2.5"),
        (0.0, 4, "0"),
    ],
)
def test_fmt_formats_significant_digits(value, digits, text):
    assert fmt(value, digits) == text


def test_tokens_read_as_they_are_in_html_and_markdown(tmp_path):
    # Jinja's tojson wrote " \u2265" and "\u003e" into reports; the token filter keeps the characters
    # and leaves HTML-escaping to autoescape, so a browser shows " ≥", ">" and "\"".
    (tmp_path / "t.html.j2").write_text("{% for t in tokens %}<code>{{ t | token }}</code>{% endfor %}")
    (tmp_path / "t.md.j2").write_text("{% for t in tokens %}{{ t | token }} {% endfor %}")
    env = environment(tmp_path)
    tokens = [" \u2265", ">", '"', "a\nb"]
    html = env.get_template("t.html.j2").render(tokens=tokens)
    assert html == (
        "<code>&#34; ≥&#34;</code><code>&#34;&gt;&#34;</code>"
        "<code>&#34;\\&#34;&#34;</code><code>&#34;a\\nb&#34;</code>"
    )
    assert env.get_template("t.md.j2").render(tokens=tokens) == '" ≥" ">" "\\"" "a\\nb" '
