r"""Select cases with pytest's ``-k`` expressions: ``-k "gradients and not layers=0-5"``.

The grammar is pytest's (``_pytest/mark/expression.py``), without its ``name(arg=value)`` form,
which ``-k`` refuses anyway::

    expression: expr? END
    expr:       and_expr ('or' and_expr)*
    and_expr:   not_expr ('and' not_expr)*
    not_expr:   'not' not_expr | '(' expr ')' | keyword
    keyword:    (\w | : | + | - | . | [ | ] | \ | / | =)+

A keyword matches when it is a case-insensitive substring of any of the strings it is matched
against (the runner passes a case's id, its step id and its analysis name). Unlike pytest, ``=`` is
part of a keyword, so ``-k aggregate_by=values`` selects the cases with that parameter; and an empty
expression matches everything, as an empty ``-k`` does in pytest.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from runner.errors import PlanError

__all__ = ["KeywordExpression", "compile_keyword_expression"]

_KEYWORD = re.compile(r"[\w:+\-.\[\]\\/=]+")
_OPERATORS = ("and", "or", "not")
_EXAMPLE = "-k 'gradients and not layers=0-5'"

# Token kinds, spelled as error messages name them.
_LEFT, _RIGHT, _WORD, _END = "'('", "')'", "a keyword", "the end of the expression"


@dataclass(frozen=True)
class _Token:
    kind: str  # one of _LEFT, _RIGHT, _WORD, _END, or an operator ("and", "or", "not")
    text: str
    column: int  # 1-based

    def describe(self) -> str:
        if self.kind in _OPERATORS:
            return repr(self.kind)
        if self.kind != _WORD:
            return self.kind
        lowercase = " (operators are lowercase)" if self.text.lower() in _OPERATORS else ""
        return f"keyword {self.text!r}{lowercase}"


def _syntax_error(text: str, column: int, problem: str) -> PlanError:
    return PlanError(
        f"-k expression {text!r} is invalid: {problem} at column {column}\n"
        f"    {text}\n    {' ' * (column - 1)}^\n"
        "Combine keywords (case-insensitive substrings of case ids, step ids and analysis names) with "
        f"and, or, not and parentheses, e.g. {_EXAMPLE}."
    )


def _tokenize(text: str) -> list[_Token]:
    tokens, position = [], 0
    while position < len(text):
        char = text[position]
        if char.isspace():
            position += 1
        elif char in "()":
            tokens.append(_Token(_LEFT if char == "(" else _RIGHT, char, position + 1))
            position += 1
        elif match := _KEYWORD.match(text, position):
            word = match.group()
            tokens.append(_Token(word if word in _OPERATORS else _WORD, word, position + 1))
            position = match.end()
        else:
            raise _syntax_error(text, position + 1, f"unexpected character {char!r}")
    tokens.append(_Token(_END, "", len(text) + 1))
    return tokens


# The parsed expression: each node answers whether it matches a list of lower-cased strings.


@dataclass(frozen=True)
class _Keyword:
    needle: str  # lower-cased

    def matches(self, haystacks: Sequence[str]) -> bool:
        return any(self.needle in haystack for haystack in haystacks)


@dataclass(frozen=True)
class _Not:
    operand: _Node

    def matches(self, haystacks: Sequence[str]) -> bool:
        return not self.operand.matches(haystacks)


@dataclass(frozen=True)
class _All:
    operands: tuple[_Node, ...]

    def matches(self, haystacks: Sequence[str]) -> bool:
        return all(operand.matches(haystacks) for operand in self.operands)


@dataclass(frozen=True)
class _Any:
    operands: tuple[_Node, ...]

    def matches(self, haystacks: Sequence[str]) -> bool:
        return any(operand.matches(haystacks) for operand in self.operands)


_Node = _Keyword | _Not | _All | _Any


class _Parser:
    """Recursive descent over the tokens, one method per grammar rule."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.position = 0

    def parse(self) -> _Node:
        if self._accept(_END):
            return _All(())  # an empty expression matches everything
        node = self._or()
        self._expect(_END, "'and', 'or' or the end of the expression")
        return node

    def _or(self) -> _Node:
        operands = [self._and()]
        while self._accept("or"):
            operands.append(self._and())
        return operands[0] if len(operands) == 1 else _Any(tuple(operands))

    def _and(self) -> _Node:
        operands = [self._not()]
        while self._accept("and"):
            operands.append(self._not())
        return operands[0] if len(operands) == 1 else _All(tuple(operands))

    def _not(self) -> _Node:
        if self._accept("not"):
            return _Not(self._not())
        if self._accept(_LEFT):
            node = self._or()
            self._expect(_RIGHT, "'and', 'or' or ')'")
            return node
        token = self._expect(_WORD, "a keyword, 'not' or '('")
        return _Keyword(token.text.lower())

    def _accept(self, kind: str) -> _Token | None:
        token = self.tokens[self.position]
        if token.kind != kind:
            return None
        if token.kind != _END:
            self.position += 1
        return token

    def _expect(self, kind: str, expected: str) -> _Token:
        token = self._accept(kind)
        if token is None:
            current = self.tokens[self.position]
            raise _syntax_error(self.text, current.column, f"expected {expected}, got {current.describe()}")
        return token


@dataclass(frozen=True)
class KeywordExpression:
    """A compiled ``-k`` expression; call it with a case's keywords to know whether it is selected."""

    text: str
    _tree: _Node

    def __call__(self, keywords: Iterable[str]) -> bool:
        """Whether the expression matches ``keywords`` (each keyword a substring, ignoring case)."""
        return self._tree.matches([keyword.lower() for keyword in keywords])


def compile_keyword_expression(expr: str) -> Callable[[Iterable[str]], bool]:
    """Compile a pytest-style ``-k`` expression into a predicate over a case's keywords.

    ``compile_keyword_expression("gradients and not layers=0")(["importance[aggregate_by=gradients]"])``
    is ``True``. An empty expression matches everything.

    Raises:
        PlanError: the expression does not parse; the message quotes it with a caret at the column
            and says what was expected there.
    """
    return KeywordExpression(expr, _Parser(expr).parse())
