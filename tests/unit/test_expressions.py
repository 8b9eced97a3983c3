"""The expectation language: what parses, what is refused (and where), evaluation and explanations."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pytest

from runner.errors import ExpressionError
from runner.expressions import MAX_LENGTH, Expression, Outcome, parse_expression

RESULTS = {
    "layers": {"5": {"mean_abs": {"max": 1.3125}}, "6": {"mean_abs": {"max": 2.5}}},
    "peak": {"value": 3.5, "layer": 7},
    "deltas": [0.5, 0.52, 0.49],
    "failed": False,
    "frac_alive": 0.25,
    "n": 0,
}


def evaluate(text: str, namespace: dict | None = None) -> Outcome:
    return parse_expression(text).evaluate(RESULTS if namespace is None else namespace)


def parse_error(text: str) -> str:
    with pytest.raises(ExpressionError) as info:
        parse_expression(text)
    return str(info.value)


def caret_column(message: str) -> int:
    """1-based column of the caret under the quoted expression (both indented by 4)."""
    caret_line = next(line for line in message.splitlines() if line.strip() == "^")
    return caret_line.index("^") - 4 + 1


# --- parsing ------------------------------------------------------------------------------------


def test_parsed_expression_keeps_its_text() -> None:
    assert parse_expression("  peak.value >= 3 ").text == "peak.value >= 3"


def test_expression_over_several_lines_is_read_as_one_line() -> None:
    expression = parse_expression("peak.value >= 3\nand failed == False")
    assert expression.text == "peak.value >= 3 and failed == False"
    assert evaluate(expression.text).passed


def test_names_are_the_namespace_names_read_not_the_functions() -> None:
    expression = parse_expression("abs(mean(deltas) - peak.value) < layers[5].mean_abs.max")
    assert expression.names() == {"deltas", "peak", "layers"}


def test_expressions_with_the_same_text_are_equal() -> None:
    assert parse_expression("a > 1") == Expression("a > 1")


def test_syntax_error_points_at_the_column() -> None:
    message = parse_error("peak.value >= 3 and and failed")
    assert message.startswith("expectation does not parse: invalid syntax at column 21")
    assert "    peak.value >= 3 and and failed" in message
    assert caret_column(message) == 21


def test_syntax_error_at_the_end_points_past_the_last_character() -> None:
    message = parse_error("peak.value >=")
    assert "at column 14" in message
    assert caret_column(message) == 14


def test_single_equals_suggests_double_equals() -> None:
    message = parse_error("peak.layer = 5")
    assert "at column 12" in message
    assert "use `==`" in message


def test_columns_count_characters_not_bytes() -> None:
    message = parse_error("'é' @ x")
    assert "operator @ at column 5" in message
    assert caret_column(message) == 5


def test_empty_expression_is_rejected() -> None:
    assert "expectation is empty" in parse_error("   ")


def test_non_string_expectation_is_rejected() -> None:
    assert "expectation must be a string, got int 3" in parse_error(3)  # type: ignore[arg-type]


def test_overlong_expression_is_rejected() -> None:
    message = parse_error("x + " * (MAX_LENGTH // 4) + "x")
    assert f"more than the limit of {MAX_LENGTH}" in message
    assert "Split it" in message


def test_deep_nesting_is_rejected() -> None:
    assert "nesting deeper than" in parse_error("-" * 200 + "x")


def test_call_to_non_whitelisted_function_is_rejected_at_parse_time() -> None:
    message = parse_error("peak.value > 1 and eval('1')")
    assert "expectation calls 'eval' at column 20, which is not an expectation function" in message
    assert caret_column(message) == 20
    assert "Available functions: abs, all, any" in message


def test_unknown_function_suggests_close_names() -> None:
    assert "Did you mean 'mean' or 'median'?" in parse_error("mena(deltas) > 0")


def test_callable_in_the_namespace_cannot_be_called() -> None:
    assert "calls 'run' at column 1" in parse_error("run(1)")


def test_method_call_is_rejected_at_parse_time() -> None:
    message = parse_error("deltas.count(1) == 0")
    assert "uses a call of `deltas.count` at column 1" in message
    assert "Methods cannot be called" in message


def test_wrong_number_of_arguments_is_rejected_at_parse_time() -> None:
    message = parse_error("mean(deltas, 2) > 0")
    assert "calls mean() with 2 argument(s) at column 1; it takes 1" in message
    assert "Usage: mean(xs)" in message


def test_unknown_keyword_argument_is_rejected_at_parse_time() -> None:
    message = parse_error("isclose(peak.value, 3, tol=0.1)")
    assert "the keyword argument tol= at column 24" in message
    assert "Usage: isclose(a, b, rel=1e-9, abs=0.0)" in message


def test_dunder_attribute_access_is_rejected() -> None:
    message = parse_error("().__class__.__bases__")
    assert "the private attribute '__bases__' at column 14" in message
    assert caret_column(message) == 14


def test_private_attribute_access_is_rejected() -> None:
    assert "the private attribute '_cache' at column 6" in parse_error("peak._cache")


def test_import_call_cannot_run_code(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(os, "system", calls.append)
    message = parse_error("__import__('os').system('echo hacked')")
    assert "uses a call of `__import__('os').system` at column 1" in message
    assert calls == []


@pytest.mark.parametrize(
    ("text", "construct", "column"),
    [
        ("lambda: 1", "a lambda", 1),
        ("max([x for x in deltas]) > 0", "a list comprehension", 5),
        ("max(x for x in deltas) > 0", "a generator expression", 4),
        ("{x for x in deltas}", "a set comprehension", 1),
        ("{k: 1 for k in peak}", "a dict comprehension", 1),
        ("f'{peak}' == 'x'", "an f-string", 1),
        ("(n := 3) > 1", "an assignment expression (:=)", 2),
        ("1 if failed else 2", "a conditional expression", 1),
        ("{'a': 1} == peak", "a dict literal", 1),
        ("{1, 2} == peak", "a set literal", 1),
        ("max(*deltas) > 0", "star unpacking (*x)", 5),
        ("[*deltas] == deltas", "star unpacking (*x)", 2),
        ("n | 1", "the operator |", 3),
        ("n & 1", "the operator &", 3),
        ("n << 40", "the operator <<", 3),
        ("(n) @ n", "the operator @", 5),
        ("~n", "the operator ~", 1),
        ("b'x' == 1", "a bytes literal", 1),
        ("1j == n", "a complex number", 1),
        ("... == n", "an ellipsis (...)", 1),
    ],
)
def test_construct_outside_the_language_is_named_with_its_column(
    text: str, construct: str, column: int
) -> None:
    message = parse_error(text)
    assert f"uses {construct}" in message
    assert f"at column {column}" in message
    assert caret_column(message) == column


def test_is_between_two_values_suggests_double_equals() -> None:
    message = parse_error("peak.layer is 5")
    assert "uses `is` between two values at column 15" in message
    assert "compare values with `==`" in message


def test_huge_power_is_refused_at_parse_time() -> None:
    message = parse_error("10**10**10 > n")
    assert "cannot compute `10**10**10` at column 1" in message
    assert "integer powers are limited" in message


def test_huge_power_of_a_result_is_refused_at_evaluation() -> None:
    outcome = evaluate("base ** 10**9 > 0", {"base": 10})
    assert not outcome.passed
    assert outcome.error is not None
    assert "could not evaluate `base ** 10**9` (column 1)" in outcome.error
    assert "integer powers are limited" in outcome.error


def test_float_power_is_allowed() -> None:
    assert evaluate("2.0 ** 0.5 > 1.41").passed


def test_huge_repetition_is_refused() -> None:
    assert "over the limit" in parse_error("'a' * 10**9 == n")


def test_percent_string_formatting_is_refused() -> None:
    assert "string formatting is not supported" in parse_error("'%999999999d' % 1 == n")


def test_constant_division_by_zero_is_rejected_at_parse_time() -> None:
    message = parse_error("peak.value > 1 / 0")
    assert "cannot compute `1 / 0` at column 14: ZeroDivisionError" in message


def test_round_with_huge_digit_count_is_refused() -> None:
    outcome = evaluate("round(n, -10**9) == 0")
    assert outcome.error is not None
    assert "ndigits must be within" in outcome.error


def test_check_names_suggests_close_names() -> None:
    expression = parse_expression("peak.value > 1 and peek.layer == 5")
    with pytest.raises(ExpressionError) as info:
        expression.check_names(RESULTS)
    message = str(info.value)
    assert "unknown name 'peek' at column 20" in message
    assert "Did you mean 'peak'?" in message
    assert "Available names: deltas, failed, frac_alive, layers, n, peak." in message


def test_check_names_accepts_known_names() -> None:
    parse_expression("peak.value > n").check_names(RESULTS)


# --- evaluation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("peak.value", 3.5),
        ("peak['layer']", 7),
        ("layers[5].mean_abs.max", 1.3125),
        ("layers['6'].mean_abs.max", 2.5),
        ("deltas[-1]", 0.49),
        ("deltas[1:]", [0.52, 0.49]),
        ("deltas[::2]", [0.5, 0.49]),
        ("[n, 1, 'a']", [0, 1, "a"]),
        ("(n, 1)", (0, 1)),
        ("-peak.value", -3.5),
        ("+peak.layer", 7),
        ("peak.layer + 1", 8),
        ("peak.layer - 1", 6),
        ("peak.layer * 2", 14),
        ("peak.layer / 2", 3.5),
        ("peak.layer // 2", 3),
        ("peak.layer % 4", 3),
        ("peak.layer ** 2", 49),
        ("2 ** -1", 0.5),
        ("deltas + [1]", [0.5, 0.52, 0.49, 1]),
        ("'ab' + 'c'", "abc"),
        ("failed or peak.layer", 7),
        ("not failed and n", 0),
        ("None", None),
    ],
)
def test_value_of_expression(text: str, value: object) -> None:
    outcome = evaluate(text)
    assert outcome.error is None
    assert outcome.value == value


@pytest.mark.parametrize(
    ("text", "passed"),
    [
        ("0 < frac_alive <= 1", True),
        ("0 < frac_alive <= 0.1", False),
        ("1 < frac_alive <= 0.1", False),
        ("peak.layer in [4, 5, 6]", False),
        ("peak.layer not in [4, 5, 6]", True),
        ("'value' in peak", True),
        ("5 in layers", True),
        ("'7' in layers", False),
        ("failed is False", True),
        ("peak is not None", True),
        ("peak.value != 3.5", False),
        ("deltas == [0.5, 0.52, 0.49]", True),
        ("not failed", True),
        ("failed or frac_alive > 0.2", True),
        ("peak.value >= 3 and peak.layer in [4, 5, 6]", False),
    ],
)
def test_comparisons_and_boolean_operators(text: str, passed: bool) -> None:
    assert evaluate(text).passed is passed


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("abs(-2)", 2),
        ("sum(abs([-1, 2]))", 3),
        ("min(deltas)", 0.49),
        ("max(deltas)", 0.52),
        ("max(peak.value, 5)", 5),
        ("sum(deltas)", pytest.approx(1.51)),
        ("len(deltas)", 3),
        ("mean([1, 2, 6])", 3.0),
        ("median([1, 2, 6])", 2.0),
        ("std([1, 3])", 1.0),
        ("all([1, True])", True),
        ("any([0, False])", False),
        ("round(3.14159, 2)", 3.14),
        ("round(2.6)", 3),
        ("argmax(deltas)", 1),
        ("argmin(deltas)", 2),
        ("isclose(0.1 + 0.2, 0.3)", True),
        ("isclose(1.0, 1.1, rel=0.2)", True),
        ("isclose(0.0, 1e-4, abs=1e-3)", True),
        ("isclose(1.0, 1.1)", False),
        ("sorted(deltas)", [0.49, 0.5, 0.52]),
        ("sorted(deltas, reverse=True)[0]", 0.52),
        ("count([1, 0, 2])", 2),
        ("count([1, 0, 1], 1)", 2),
    ],
)
def test_whitelisted_function(text: str, value: object) -> None:
    outcome = evaluate(text)
    assert outcome.error is None
    assert np.all(outcome.value == value)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("max(x)", 3.0),
        ("min(x)", 1.0),
        ("sum(x)", 6.0),
        ("len(x)", 3),
        ("mean(x)", 2.0),
        ("median(x)", 2.0),
        ("argmax(x)", 2),
        ("all(x > 0)", True),
        ("any(x > 2.5)", True),
        ("count(x > 1)", 2),
        ("sorted(x)", [1.0, 2.0, 3.0]),
        ("all(0 < x <= 3)", True),
        ("all(isclose(x, [1, 2, 3.0000000001]))", True),
        ("x[-1]", 3.0),
        ("x.shape", (3,)),
    ],
)
def test_functions_accept_numpy_arrays(text: str, value: object) -> None:
    outcome = evaluate(text, {"x": np.array([1.0, 2.0, 3.0])})
    assert outcome.error is None
    assert outcome.value == value


def test_numpy_index_with_slices_selects_a_column() -> None:
    outcome = evaluate("max(x[:, 1]) == 5", {"x": np.arange(6).reshape(3, 2)})
    assert outcome.passed


def test_string_key_that_looks_like_an_int_finds_an_int_key() -> None:
    assert evaluate("x['-3'] == 1", {"x": {-3: 1}}).passed


def test_numpy_bool_final_value_decides_the_outcome() -> None:
    outcome = evaluate("x > 1", {"x": np.float32(2.0)})
    assert outcome.passed is True
    assert outcome.value is True


def test_array_with_one_element_as_final_value_decides_the_outcome() -> None:
    assert evaluate("x > 1", {"x": np.array([2.0])}).passed


def test_array_as_final_value_is_an_error_suggesting_all_or_any() -> None:
    outcome = evaluate("x > 1", {"x": np.array([1.0, 2.0])})
    assert not outcome.passed
    assert outcome.error == (
        "`x > 1` is an array of 2 values, which is neither true nor false; write `all(x > 1)` or `any(x > 1)`"
    )


def test_array_operand_of_and_is_an_error_naming_the_operand() -> None:
    outcome = evaluate("x > 1 and n == 0", {"x": np.array([1.0, 2.0]), "n": 0})
    assert outcome.error is not None
    assert outcome.error.startswith("`x > 1` is an array of 2 values")


@dataclass
class Report:
    score: float

    def recompute(self) -> float:
        raise AssertionError("an expectation called a method")

    @property
    def broken(self) -> float:
        raise RuntimeError("disk on fire")


def test_public_attribute_of_an_object_is_read() -> None:
    assert evaluate("report.score > 0.5", {"report": Report(0.75)}).passed


def test_method_of_an_object_is_not_called() -> None:
    outcome = evaluate("report.recompute > 0", {"report": Report(0.75)})
    assert outcome.error is not None
    assert "'recompute' is a method of Report, and methods cannot be called" in outcome.error


def test_method_with_a_function_twin_suggests_the_function() -> None:
    outcome = evaluate("x.max > 0", {"x": np.array([1.0])})
    assert outcome.error is not None
    assert "write `max(...)` instead" in outcome.error


def test_exception_from_a_result_object_is_reported_not_raised() -> None:
    outcome = evaluate("report.broken > 0", {"report": Report(0.75)})
    assert outcome.error == "could not evaluate `report.broken` (column 1): RuntimeError: disk on fire"


def test_unknown_name_suggests_close_names() -> None:
    outcome = evaluate("peek.value > 3")
    assert not outcome.passed
    assert outcome.error == (
        "could not evaluate `peek` (column 1): unknown name 'peek'. Did you mean 'peak'? "
        "Available names: deltas, failed, frac_alive, layers, n, peak."
    )


def test_missing_key_lists_available_keys() -> None:
    outcome = evaluate("peak.valeu > 3")
    assert outcome.error == (
        "could not evaluate `peak.valeu` (column 1): no key 'valeu'. Did you mean 'value'? "
        "Available keys: value, layer."
    )


def test_missing_int_key_names_the_subexpression() -> None:
    outcome = evaluate("layers[7].mean_abs.max > 2")
    assert outcome.error is not None
    assert outcome.error.startswith("could not evaluate `layers[7]` (column 1): no key 7.")


def test_index_out_of_range_names_the_subexpression() -> None:
    outcome = evaluate("deltas[3] > 0")
    assert outcome.error == (
        "could not evaluate `deltas[3]` (column 1): index 3 is out of range for a list of length 3"
    )


def test_division_by_zero_is_reported_not_raised() -> None:
    outcome = evaluate("mean(deltas) / n > 1")
    assert not outcome.passed
    assert outcome.value is None
    assert outcome.error == (
        "could not evaluate `mean(deltas) / n` (column 1): ZeroDivisionError: float division by zero"
    )


def test_type_error_is_reported_not_raised() -> None:
    outcome = evaluate("peak > 1")
    assert outcome.error is not None
    assert outcome.error.startswith("could not evaluate `peak > 1` (column 1): TypeError: '>' not supported")


def test_statistic_of_an_empty_list_is_an_error() -> None:
    outcome = evaluate("mean(empty) > 0", {"empty": []})
    assert outcome.error == "could not evaluate `mean(empty)` (column 1): mean() of an empty list"


def test_max_of_an_empty_array_is_an_error() -> None:
    outcome = evaluate("max(x) > 0", {"x": np.array([])})
    assert outcome.error == "could not evaluate `max(x)` (column 1): max() of an empty array"


def test_short_circuit_skips_the_failing_operand() -> None:
    assert evaluate("failed and missing > 1").error is None


# --- explanation --------------------------------------------------------------------------------


def test_failed_comparison_shows_actual_values() -> None:
    outcome = evaluate("layers[5].mean_abs.max > 2")
    assert not outcome.passed
    assert outcome.explanation == (
        "assert layers[5].mean_abs.max > 2\nassert 1.3125 > 2\n +  where 1.3125 = layers[5].mean_abs.max"
    )


def test_failed_and_shows_the_operands_up_to_the_failing_one() -> None:
    outcome = evaluate("peak.value >= 3 and peak.layer in [4, 5, 6] and n == 0")
    assert outcome.explanation.splitlines() == [
        "assert peak.value >= 3 and peak.layer in [4, 5, 6] and n == 0",
        "assert (3.5 >= 3) and (7 in [4, 5, 6])",
        " +  where 3.5 = peak.value",
        " +  and   7 = peak.layer",
    ]


def test_call_explanation_shows_its_arguments_nested() -> None:
    outcome = evaluate("abs(mean(deltas) - 0.5) < 1e-3")
    assert outcome.explanation.splitlines() == [
        "assert abs(mean(deltas) - 0.5) < 1e-3",
        "assert 0.00333333 < 1e-3",
        " +  where 0.00333333 = abs(mean(deltas) - 0.5)",
        " +    where 0.503333 = mean(deltas)",
        " +      where [0.5, 0.52, 0.49] = deltas",
    ]


def test_not_explanation_shows_the_operand() -> None:
    outcome = evaluate("not ok", {"ok": True})
    assert outcome.explanation.splitlines()[1:] == ["assert not True", " +  where True = ok"]


def test_floats_are_shown_with_six_significant_digits() -> None:
    outcome = evaluate("x > 1", {"x": 0.123456789})
    assert "assert 0.123457 > 1" in outcome.explanation


def test_whole_floats_still_look_like_floats() -> None:
    assert "assert 3.0 > 4" in evaluate("x > 4", {"x": 3.0}).explanation


def test_long_lists_are_truncated_in_the_explanation() -> None:
    outcome = evaluate("len(x) < 5", {"x": list(range(100))})
    assert " +    where [0, 1, 2, 3, 4, 5, 6, 7, ... (100 items)] = x" in outcome.explanation


def test_long_arrays_are_truncated_in_the_explanation() -> None:
    outcome = evaluate("max(x) < 0", {"x": np.arange(20.0).reshape(4, 5)})
    assert (
        "where array([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, ...], shape=(4, 5)) = x" in outcome.explanation
    )


def test_error_explanation_shows_values_so_far_and_the_error() -> None:
    outcome = evaluate("mean(deltas) / n > 1")
    assert outcome.explanation.splitlines() == [
        "assert mean(deltas) / n > 1",
        "assert (0.503333 / 0) > 1",
        " +  where 0.503333 = mean(deltas)",
        " +    where [0.5, 0.52, 0.49] = deltas",
        " +  and   0 = n",
        "could not evaluate `mean(deltas) / n` (column 1): ZeroDivisionError: float division by zero",
    ]


def test_passing_outcome_carries_value_and_explanation() -> None:
    outcome = evaluate("peak.layer == 7")
    assert outcome == Outcome(
        passed=True,
        value=True,
        explanation="assert peak.layer == 7\nassert 7 == 7\n +  where 7 = peak.layer",
    )
