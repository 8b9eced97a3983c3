"""``-k`` selection: pytest's grammar and substring semantics, and errors that point at the column."""

from __future__ import annotations

import pytest
from _pytest.mark.expression import Expression as PytestExpression

from runner.errors import PlanError
from runner.keywords import compile_keyword_expression

CASE = ["importance[aggregate_by=gradients-layers=0-5]", "importance", "attribution"]


def selects(expr: str, keywords: list[str] = CASE) -> bool:
    return compile_keyword_expression(expr)(keywords)


def pytest_selects(expr: str, keywords: list[str]) -> bool:
    """What ``pytest -k expr`` answers for an item with these keywords (substring, ignoring case)."""

    def matcher(name: str, /, **kwargs: object) -> bool:
        return any(name.lower() in keyword.lower() for keyword in keywords)

    return PytestExpression.compile(expr).evaluate(matcher)


def syntax_error(expr: str) -> str:
    with pytest.raises(PlanError) as info:
        compile_keyword_expression(expr)
    return str(info.value)


def test_empty_expression_matches_everything() -> None:
    assert selects("")
    assert selects("   ", [])


def test_keyword_matches_a_substring_ignoring_case() -> None:
    assert selects("GRADIENTS")
    assert not selects("values")


def test_keyword_matches_any_of_the_strings() -> None:
    assert selects("attribution")
    assert not selects("ablation")


def test_keyword_with_equals_sign_matches_a_parameter() -> None:
    assert selects("aggregate_by=gradients")
    assert not selects("aggregate_by=values")


def test_keyword_with_brackets_and_dashes_matches_the_case_id() -> None:
    assert selects("[aggregate_by=gradients-layers=0-5]")


def test_keyword_not_and_or_precedence_matches_pytest() -> None:
    # not binds tighter than and, which binds tighter than or.
    assert selects("not values and importance or ablation")
    assert not selects("not (values or importance)")
    assert selects("values and ablation or importance")
    assert not selects("values and (ablation or importance)")


def test_parentheses_group_subexpressions() -> None:
    assert selects("(values or gradients) and (importance)")


def test_operators_are_lowercase_only_as_in_pytest() -> None:
    # `NOT` is a keyword, matched as a substring, like in pytest.
    assert selects("NOT", ["cannot"])
    assert pytest_selects("NOT", ["cannot"])


def test_uppercase_operator_in_operator_position_hints_at_lowercase() -> None:
    message = syntax_error("gradients AND importance")
    assert "got keyword 'AND' (operators are lowercase) at column 11" in message


def test_operator_words_inside_keywords_are_keywords() -> None:
    assert selects("android or importance")
    assert selects("notable", ["notable-case"])


def test_matcher_accepts_any_iterable_of_keywords() -> None:
    assert compile_keyword_expression("b")(keyword for keyword in ["a", "b"])


@pytest.mark.parametrize(
    "expr",
    [
        "importance",
        "not importance",
        "gradients and layers",
        "gradients and not layers",
        "values or attribution",
        "not values and importance or ablation",
        "not (values or importance)",
        "values and ablation or importance",
        "values and (ablation or importance)",
        "not not importance",
        "((importance))",
        "IMPORTANCE",
        "ATTR and not gRaDiEnTs",
        "layers-0 or layers:0",
        "importance[aggregate_by",
        "0-5] and not x/y",
        "a\\b or c.d or e+f",
        "True or False",
        "None",
    ],
)
@pytest.mark.parametrize(
    "keywords",
    [
        CASE,
        ["importance[aggregate_by=values-layers=6-11]", "importance", "attribution"],
        ["ablation[target=none]", "ablation", "x/y"],
        ["a\\b", "True"],
        [],
    ],
    ids=["gradients", "values", "ablation", "odd", "empty"],
)
def test_matches_pytest_on_the_same_expression(expr: str, keywords: list[str]) -> None:
    assert selects(expr, keywords) is pytest_selects(expr, keywords)


@pytest.mark.parametrize(
    "expr",
    ["a and", "not", "(a", "a)", "a b", "and a", "()", "a or or b", "a & b", "a | b", "a, b", "a(b)"],
)
def test_syntax_errors_match_pytest(expr: str) -> None:
    with pytest.raises(SyntaxError):
        PytestExpression.compile(expr)
    with pytest.raises(PlanError):
        compile_keyword_expression(expr)


def test_missing_operand_says_what_was_expected_with_caret() -> None:
    message = syntax_error("gradients and")
    assert message.splitlines()[:3] == [
        "-k expression 'gradients and' is invalid: expected a keyword, 'not' or '(', "
        "got the end of the expression at column 14",
        "    gradients and",
        "                 ^",
    ]
    assert "e.g. -k 'gradients and not layers=0-5'" in message


def test_missing_operator_points_at_the_second_keyword() -> None:
    message = syntax_error("gradients layers")
    assert "expected 'and', 'or' or the end of the expression, got keyword 'layers' at column 11" in message


def test_unclosed_parenthesis_is_reported_at_the_end() -> None:
    message = syntax_error("(gradients or values")
    assert "expected 'and', 'or' or ')', got the end of the expression at column 21" in message


def test_repeated_operator_is_reported_at_its_column() -> None:
    assert "expected a keyword, 'not' or '(', got 'or' at column 6" in syntax_error("a or or b")


def test_unexpected_character_is_reported_at_its_column() -> None:
    message = syntax_error("gradients & layers")
    assert "unexpected character '&' at column 11" in message
    assert message.splitlines()[2] == "              ^"
