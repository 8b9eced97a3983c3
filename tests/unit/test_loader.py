"""The YAML loader on hostile input: every bound refuses with a located error, ordinary aliases still work.

Each test's input finishes quickly even if its bound were lost (the bombs here are small, and the
bounds are lowered instead), so that a regression fails rather than hangs; the full-size alias
bomb runs in a subprocess with a timeout, in ``tests/integration/test_cli_validate.py``.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from runner import loader
from runner.errors import SpecError
from runner.loader import read_document


@pytest.fixture
def read(tmp_path: Path):
    """Write ``text`` (dedented) to ``spec.yaml`` and read it."""

    def read_text(text: str) -> loader.SpecDocument:
        path = tmp_path / "spec.yaml"
        path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
        return read_document(path, "spec.yaml")

    return read_text


def refusal(read, text: str) -> str:
    """The message of the :class:`SpecError` that reading ``text`` raises."""
    with pytest.raises(SpecError) as info:
        read(text)
    return str(info.value)


def problems(doc: loader.SpecDocument) -> list[str]:
    return [str(p) for p in doc.problems]


def laughs(levels: int) -> str:
    """A "billion laughs" document: each line a list of 9 aliases of the line before."""
    lines = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for before, name in zip("abcdefghi", "bcdefghij"[: levels - 1], strict=False):
        lines.append(f"{name}: &{name} [{', '.join([f'*{before}'] * 9)}]")
    return "\n".join(lines) + "\n"


def test_alias_bomb_is_refused_at_the_alias_that_overflows(read, monkeypatch):
    monkeypatch.setattr(loader, "MAX_VALUES", 1_000)
    message = refusal(read, laughs(5))  # 66,430 values once expanded; 820 up to line 3
    first, hint = message.splitlines()
    assert first == "spec.yaml:4:8: d[0]: the alias *c expands so that the spec holds more than 1,000 values"
    assert "Write the values out, or use fewer aliases." in hint


def test_the_value_bound_counts_each_use_of_an_alias(read, monkeypatch):
    monkeypatch.setattr(loader, "MAX_VALUES", 1 + 3 + 1 + 3 * 3)  # the root, a and its 2 items, b, 3 * a
    text = "a: &x [1, 2]\nb: [*x, *x, *x]\n"
    assert read(text).data == {"a": [1, 2], "b": [[1, 2]] * 3}
    monkeypatch.setattr(loader, "MAX_VALUES", 1 + 3 + 1 + 3 * 3 - 1)
    assert refusal(read, text).startswith("spec.yaml:2:13: b[2]: the alias *x expands so that")


def test_too_many_values_without_aliases_are_located_at_the_first_one_past(read, monkeypatch):
    monkeypatch.setattr(loader, "MAX_VALUES", 10)
    message = refusal(read, f"name: x\nxs: [{', '.join(['1'] * 20)}]\n")  # the root, name, xs, xs[0]...
    first, hint = message.splitlines()
    assert first == "spec.yaml:2:27: xs[7]: the spec holds more than 10 values"
    assert hint.endswith("keep data (prompts, tables) in a file the spec names.")


def test_aliases_used_a_few_times_keep_values_and_positions(read):
    doc = read("""
        defaults: &defaults
          value: 2.0
          n: 4
        steps:
          - id: a
            params: *defaults
          - id: b
            params: {<<: *defaults, n: 5}
    """)
    assert doc.problems == []
    assert doc.data["steps"] == [
        {"id": "a", "params": {"value": 2.0, "n": 4}},
        {"id": "b", "params": {"value": 2.0, "n": 5}},
    ]
    assert doc.values[("steps", 0, "params")] == (6, 13)  # the alias, where the value is used
    assert doc.values[("steps", 0, "params", "value")] == (2, 10)  # the anchor's text
    assert doc.keys[("steps", 1, "params", "value")] == (2, 3)
    assert doc.values[("steps", 1, "params", "n")] == (8, 32)  # the mapping's own key wins


def test_merge_keys_take_earlier_mappings_first_as_yaml_does(read):
    doc = read("""
        a: &a {x: 1, y: 1}
        b: &b {y: 2, z: 2}
        c: {<<: [*a, *b], z: 3}
    """)
    assert doc.data["c"] == {"x": 1, "y": 1, "z": 3}
    assert doc.values[("c", "y")] == (1, 17)


def test_merging_a_non_mapping_is_a_located_problem(read):
    doc = read("n: &n 3\nc: {<<: *n, x: 1}\n")
    assert problems(doc) == [
        "spec.yaml:2:9: c: a merge key (<<) takes a mapping or a list of mappings, such as *defaults"
    ]
    assert doc.data["c"] == {"x": 1}


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("a: &a [1, *a]\n", "spec.yaml:1:11: a[1]"),
        ("a: &a {b: *a}\n", "spec.yaml:1:11: a.b"),
        ("a: &a {<<: *a}\n", "spec.yaml:1:12: a"),
    ],
)
def test_an_alias_inside_its_own_anchor_is_a_problem_not_a_loop(read, text, where):
    assert problems(read(text)) == [
        f"{where}: the alias *a is inside its own anchor, so it never ends; write the values out"
    ]


def test_deep_nesting_is_refused_while_composing(read):
    message = refusal(read, "x: " + "[" * 10_000 + "]" * 10_000 + "\n")
    # the 100th "[" (column 103) would hold the 101st level: the mapping is the first
    assert message.startswith("spec.yaml:1:103: values nest more than 100 levels deep")


def test_nesting_just_inside_the_bound_is_read(read):
    lists = loader.MAX_DEPTH - 2  # under the root mapping, around the scalar
    assert read("x: " + "[" * lists + "1" + "]" * lists + "\n").data["x"] is not None


def test_aliases_cannot_nest_values_past_the_depth_bound(read):
    levels = "[" * 30 + "{}" + "]" * 30
    text = "".join(f"a{i}: &a{i} {levels.replace('{}', f'*a{i - 1}' if i else '1')}\n" for i in range(5))
    message = refusal(read, text)
    assert message.startswith("spec.yaml:4:39: a3")
    assert "the alias *a2 expands so that values nest more than 100 levels deep" in message


def test_a_file_past_the_size_bound_is_refused_before_parsing(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_bytes(b"name: [" * (loader.MAX_SPEC_BYTES // 7 + 1))  # unparseable: never parsed
    with pytest.raises(SpecError, match=r"^big\.yaml: the file is larger than 64 KiB\n"):
        read_document(path, "big.yaml")


def test_a_file_at_the_size_bound_is_read(tmp_path):
    path = tmp_path / "full.yaml"
    path.write_bytes(b"name: x\n#" + b"-" * (loader.MAX_SPEC_BYTES - 10) + b"\n")
    assert read_document(path).data == {"name": "x"}


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_an_endless_file_is_read_only_up_to_the_bound():
    with pytest.raises(SpecError, match="larger than 64 KiB"):
        read_document(Path("/dev/zero"))


@pytest.mark.parametrize(
    "number",
    ["9" * 10_000, ":".join(["1"] * 2_000), "1." + "0" * 5_000],
    ids=["decimal", "base-60", "float"],
)
def test_overlong_numbers_are_located_problems(read, number):
    doc = read(f"name: x\nseed: {number}\n")
    assert problems(doc) == [
        f"spec.yaml:2:7: seed: a number {len(number):,} characters long; quote it if it is meant as text"
    ]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("!!int abc", "cannot read 'abc' as an integer"),
        ("!!float 1e", "cannot read '1e' as a number"),
        ("!!bool maybe", "cannot read 'maybe' as a boolean"),
        ("!!timestamp soon", "cannot read 'soon' as a date"),
        ("2024-13-45", "cannot read '2024-13-45' as a date (month must be in 1..12)"),
        ("0000-01-01", "cannot read '0000-01-01' as a date (year 0 is out of range)"),
    ],
)
def test_unreadable_scalars_are_located_problems(read, value, message):
    assert problems(read(f"name: x\nseed: {value}\n")) == [
        f"spec.yaml:2:7: seed: {message}; fix it, or quote it to keep it as text"
    ]


def test_unreadable_keys_are_located_problems(read):
    assert problems(read("name: x\n!!int abc: 1\n")) == [
        "spec.yaml:2:1: cannot read 'abc' as an integer; fix it, or quote it to keep it as text"
    ]


def test_control_characters_are_located(read):
    message = refusal(read, "name: x\nseed: a\x01b\n")
    assert message == "spec.yaml:2:8: a character that YAML does not allow (U+0001); delete it"


def test_a_duplicate_anchor_names_both_lines(read):
    message = refusal(read, "a: &x 1\nb: &x 2\n")
    assert message == "spec.yaml:2:4: the anchor &x is defined twice (first at line 1); rename one"


def test_a_stream_of_documents_stops_at_the_second(read):
    message = refusal(read, "name: a\n" + "---\nname: b\n" * 5_000)
    assert message.startswith("spec.yaml:2:1: more than one YAML document (---)")
