"""A small, safe expectation language: ``peak.value >= 3 and peak.layer in [4, 5, 6]``.

Specs state expectations on a step's results as Python-like expressions. :mod:`ast` serves only as
the parser: :func:`parse_expression` checks the tree against a whitelist when the spec is loaded (so
``runner validate`` finds mistakes without running anything), and :meth:`Expression.evaluate` walks
it with its own evaluator. Nothing is ever passed to ``eval``, ``exec`` or ``compile``.

The language: numbers, strings, ``True``/``False``/``None``; names looked up in the namespace;
``a.b`` (a dict's key ``'b'``, or a public non-callable attribute); ``a[0]``, ``a['k']``, ``a[-1]``,
``a[1:3]`` (dict keys match as int or string, since JSON keys are strings); comparisons, chained
too (``0 < x <= 1``), ``in``, ``is``; ``and``/``or``/``not``; ``+ - * / // % **``; list and tuple
literals; and calls to the functions in :data:`FUNCTIONS`.

A result explains itself the way pytest's assertion rewriting does::

    assert layers[5].mean_abs.max > 2
    assert 1.3125 > 2
     +  where 1.3125 = layers[5].mean_abs.max
"""

from __future__ import annotations

import ast
import math
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from runner.errors import ExpressionError
from runner.registry import did_you_mean

__all__ = ["FUNCTIONS", "Expression", "Function", "Outcome", "parse_expression"]


class _Numpy:
    """numpy, imported on first use: validating a spec parses expressions but evaluates none."""

    def __getattr__(self, name: str) -> Any:
        import numpy

        return getattr(numpy, name)


if TYPE_CHECKING:
    import numpy as np
else:
    np = _Numpy()

MAX_LENGTH = 1000
"""Longest expression accepted, in characters; an expectation is one line, not a program."""
MAX_DEPTH = 100
"""Deepest nesting of sub-expressions accepted; keeps the evaluator far from the recursion limit."""
MAX_POWER_BITS = 10_000
"""Largest integer ``a ** b`` may produce, in bits (about 3000 digits): ``10**10**10`` is refused."""
MAX_SEQUENCE_LENGTH = 100_000
"""Longest list or string ``*`` may produce: ``'a' * 10**9`` is refused."""
MAX_ROUND_DIGITS = 100
"""Largest ``ndigits`` for ``round``: ``round(5, -10**9)`` would compute ``10**(10**9)``."""

_EXAMPLE = "peak.value >= 3 and peak.layer in [4, 5, 6]"


# --- functions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Function:
    """A function expressions may call, with the arguments it accepts (checked at parse time)."""

    impl: Callable[..., Any]
    usage: str
    min_args: int = 1
    max_args: int | None = 1
    keywords: frozenset[str] = frozenset()


class _EvaluationError(Exception):
    """An expression that fails on these values (missing key, bad type); becomes ``Outcome.error``."""


def _to_python(value: Any) -> Any:
    """Numpy scalars as Python scalars, so results print and serialize plainly."""
    return value.item() if isinstance(value, np.generic) else value


def _is_collection(value: Any) -> bool:
    return isinstance(value, list | tuple | np.ndarray)


def _as_float_array(values: Any, function: str) -> np.ndarray:
    if not _is_collection(values):
        raise _EvaluationError(f"{function}() needs a list or array, got {type(values).__name__}")
    array = np.asarray(values, dtype=float)
    if array.size == 0:
        raise _EvaluationError(f"{function}() of an empty list")
    return array


def _abs(value: Any) -> Any:
    return np.abs(np.asarray(value)) if _is_collection(value) else abs(value)


def _extreme(name: str, builtin: Callable[..., Any]) -> Callable[..., Any]:
    def extreme(*args: Any) -> Any:
        if len(args) > 1:
            return builtin(args)
        (values,) = args
        if isinstance(values, np.ndarray):
            if values.size == 0:
                raise _EvaluationError(f"{name}() of an empty array")
            return _to_python(getattr(np, name)(values))
        if isinstance(values, Mapping):
            raise _EvaluationError(f"{name}() of a dict: pass a list or an array of numbers")
        if isinstance(values, list | tuple) and not values:
            raise _EvaluationError(f"{name}() of an empty list")
        return builtin(values)

    return extreme


def _sum(values: Any) -> Any:
    return _to_python(np.sum(values)) if isinstance(values, np.ndarray) else sum(values)


def _statistic(name: str) -> Callable[[Any], float]:
    """numpy's ``name`` (mean, median, std) of a list of numbers."""

    def statistic(values: Any) -> float:
        return float(getattr(np, name)(_as_float_array(values, name)))

    return statistic


def _arg_extreme(name: str) -> Callable[[Any], int]:
    """numpy's ``name`` (argmax, argmin) of a list of numbers."""

    def arg_extreme(values: Any) -> int:
        return int(getattr(np, name)(_as_float_array(values, name)))

    return arg_extreme


def _all(values: Any) -> bool:
    return bool(np.all(np.asarray(values)))


def _any(values: Any) -> bool:
    return bool(np.any(np.asarray(values)))


def _round(value: Any, ndigits: Any = None) -> Any:
    if ndigits is not None and abs(ndigits) > MAX_ROUND_DIGITS:
        raise _EvaluationError(f"round() to {ndigits} digits: ndigits must be within ±{MAX_ROUND_DIGITS}")
    if _is_collection(value):
        return np.round(np.asarray(value, dtype=float), ndigits or 0)
    return round(value, ndigits)


def _isclose(a: Any, b: Any, rel: float = 1e-9, abs: float = 0.0) -> Any:
    if _is_collection(a) or _is_collection(b):
        a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
        return np.abs(a - b) <= np.maximum(rel * np.maximum(np.abs(a), np.abs(b)), abs)
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs)


def _sorted(values: Any, reverse: bool = False) -> list[Any]:
    items = values.tolist() if isinstance(values, np.ndarray) else values
    return sorted(items, reverse=bool(reverse))


_MISSING = object()


def _count(values: Any, value: Any = _MISSING) -> int:
    items = values.tolist() if isinstance(values, np.ndarray) else values
    if value is _MISSING:
        return sum(1 for item in items if item)
    return sum(1 for item in items if item == value)


FUNCTIONS: dict[str, Function] = {
    "abs": Function(_abs, "abs(x): absolute value, elementwise on a list or array"),
    "all": Function(_all, "all(xs): every element is true (use on an array comparison: all(x > 0))"),
    "any": Function(_any, "any(xs): some element is true"),
    "argmax": Function(_arg_extreme("argmax"), "argmax(xs): index of the largest element"),
    "argmin": Function(_arg_extreme("argmin"), "argmin(xs): index of the smallest element"),
    "count": Function(
        _count, "count(xs) or count(xs, v): number of true elements, or of elements == v", 1, 2
    ),
    "isclose": Function(
        _isclose, "isclose(a, b, rel=1e-9, abs=0.0): like math.isclose", 2, 2, frozenset({"rel", "abs"})
    ),
    "len": Function(len, "len(xs): number of elements"),
    "max": Function(_extreme("max", max), "max(xs) or max(a, b, ...): largest value", 1, None),
    "mean": Function(_statistic("mean"), "mean(xs): arithmetic mean"),
    "median": Function(_statistic("median"), "median(xs): median"),
    "min": Function(_extreme("min", min), "min(xs) or min(a, b, ...): smallest value", 1, None),
    "round": Function(_round, "round(x) or round(x, ndigits): rounded value", 1, 2),
    "sorted": Function(_sorted, "sorted(xs, reverse=False): a sorted list", 1, 1, frozenset({"reverse"})),
    "std": Function(_statistic("std"), "std(xs): population standard deviation (ddof=0)"),
    "sum": Function(_sum, "sum(xs): sum of the elements"),
}
"""The only functions an expression may call, by name."""


# --- positions and messages -----------------------------------------------------------------


def _column(text: str, node: ast.AST) -> int:
    """1-based character column of ``node`` (``ast`` counts UTF-8 bytes)."""
    offset = getattr(node, "col_offset", 0)
    return len(text.encode()[:offset].decode("utf-8", errors="replace")) + 1


def _pointer(text: str, column: int) -> str:
    """The expression and a caret line under ``column`` (1-based)."""
    column = max(1, min(column, len(text) + 1))
    return f"    {text}\n    {' ' * (column - 1)}^"


def _located(headline: str, text: str, column: int, hint: str) -> ExpressionError:
    """An error whose message quotes the expression with a caret under ``column``."""
    return ExpressionError(f"{headline}\n{_pointer(text, column)}\n{hint}")


def _source(text: str, node: ast.AST) -> str:
    return ast.get_source_segment(text, node) or type(node).__name__


_LANGUAGE = (
    "Expectations may use names, a.b, a[0], comparisons (0 < x <= 1, x in [1, 2]), and/or/not, "
    "+ - * / // % **, [list] literals, and calls to: " + ", ".join(FUNCTIONS) + "."
)


# --- parse-time checks ----------------------------------------------------------------------

_CONSTRUCTS: dict[type[ast.AST], str] = {
    ast.Lambda: "a lambda",
    ast.ListComp: "a list comprehension",
    ast.SetComp: "a set comprehension",
    ast.DictComp: "a dict comprehension",
    ast.GeneratorExp: "a generator expression",
    ast.JoinedStr: "an f-string",
    ast.FormattedValue: "an f-string",
    ast.NamedExpr: "an assignment expression (:=)",
    ast.IfExp: "a conditional expression (x if c else y)",
    ast.Dict: "a dict literal",
    ast.Set: "a set literal",
    ast.Starred: "star unpacking (*x)",
    ast.Await: "await",
    ast.Yield: "yield",
    ast.YieldFrom: "yield from",
}
_CONSTRUCT_HINTS: dict[type[ast.AST], str] = {
    ast.ListComp: "Apply a function to the whole list instead, e.g. `min(values) > 0` or `all(array > 0)`.",
    ast.GeneratorExp: "Apply a function to the whole list instead, e.g. `max(values)` or `all(array > 0)`.",
    ast.Lambda: "Apply a function to the whole list instead, e.g. `max(values)`.",
    ast.NamedExpr: "To compare, use `==`.",
    ast.IfExp: "Write the condition with `and`/`or` instead.",
}
_CONSTANT_TYPES = (bool, int, float, str, type(None))
_OTHER_LITERALS = {bytes: "a bytes literal", complex: "a complex number", type(...): "an ellipsis (...)"}

_BINARY: dict[type[ast.operator], tuple[str, Callable[[Any, Any], Any]]] = {
    ast.Add: ("+", lambda a, b: a + b),
    ast.Sub: ("-", lambda a, b: a - b),
    ast.Mult: ("*", lambda a, b: _repeat(a, b)),
    ast.Div: ("/", lambda a, b: a / b),
    ast.FloorDiv: ("//", lambda a, b: a // b),
    ast.Mod: ("%", lambda a, b: _modulo(a, b)),
    ast.Pow: ("**", lambda a, b: _power(a, b)),
}
_OPERATOR_SYMBOLS = {
    ast.MatMult: "@",
    ast.LShift: "<<",
    ast.RShift: ">>",
    ast.BitOr: "|",
    ast.BitXor: "^",
    ast.BitAnd: "&",
    ast.Invert: "~",
}
_UNARY: dict[type[ast.unaryop], str] = {ast.Not: "not ", ast.USub: "-", ast.UAdd: "+"}
_COMPARE: dict[type[ast.cmpop], str] = {
    ast.Eq: "==",
    ast.NotEq: "!=",
    ast.Lt: "<",
    ast.LtE: "<=",
    ast.Gt: ">",
    ast.GtE: ">=",
    ast.In: "in",
    ast.NotIn: "not in",
    ast.Is: "is",
    ast.IsNot: "is not",
}


def _is_singleton(node: ast.AST) -> bool:
    """Whether ``node`` is the literal None, True or False (the only sensible operands of ``is``)."""
    return isinstance(node, ast.Constant) and any(node.value is s for s in (None, True, False))


def _arity(function: Function) -> str:
    """``1``, ``1 to 2``, ``at least 1``: how many positional arguments ``function`` takes."""
    if function.max_args is None:
        return f"at least {function.min_args}"
    if function.max_args == function.min_args:
        return str(function.min_args)
    return f"{function.min_args} to {function.max_args}"


class _Checker:
    """Walks a parsed tree and refuses anything outside the language, naming it and its column."""

    def __init__(self, text: str) -> None:
        self.text = text

    def check(self, node: ast.AST, depth: int = 0) -> None:
        if depth > MAX_DEPTH:
            raise self._refuse(node, f"nesting deeper than {MAX_DEPTH} levels", "Split the expectation.")
        check = getattr(self, f"_check_{type(node).__name__}", None)
        if check is None:
            description = _CONSTRUCTS.get(type(node), f"a {type(node).__name__} expression")
            hint = _CONSTRUCT_HINTS.get(type(node), "")
            raise self._refuse(node, description, hint)
        check(node)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.expr | ast.keyword):
                self.check(child, depth + 1)

    def _refuse(self, node: ast.AST, what: str, hint: str = "", column: int | None = None) -> ExpressionError:
        """``expectation uses <what> at column N, which expectations do not allow``, and a caret."""
        column = column or _column(self.text, node)
        return self._error(f"uses {what} at column {column}, which expectations do not allow", column, hint)

    def _error(self, problem: str, column: int, hint: str = "") -> ExpressionError:
        return _located(f"expectation {problem}", self.text, column, hint or _LANGUAGE)

    def _check_Constant(self, node: ast.Constant) -> None:
        if not isinstance(node.value, _CONSTANT_TYPES):
            raise self._refuse(node, _OTHER_LITERALS.get(type(node.value), f"the literal {node.value!r}"))

    def _check_Attribute(self, node: ast.Attribute) -> None:
        if node.attr.startswith("_"):
            column = _column(self.text, node) + len(_source(self.text, node)) - len(node.attr)
            hint = "Names starting with '_' are private; only public fields of a result can be read."
            raise self._refuse(node, f"the private attribute {node.attr!r}", hint, column)

    def _check_BinOp(self, node: ast.BinOp) -> None:
        if type(node.op) not in _BINARY:
            symbol = _OPERATOR_SYMBOLS.get(type(node.op), type(node.op).__name__)
            raise self._refuse(node, f"the operator {symbol}", column=self._operator_column(node))

    def _check_UnaryOp(self, node: ast.UnaryOp) -> None:
        if type(node.op) not in _UNARY:
            raise self._refuse(node, f"the operator {_OPERATOR_SYMBOLS.get(type(node.op), '?')}")

    def _check_Call(self, node: ast.Call) -> None:
        if not isinstance(node.func, ast.Name):
            hint = "Methods cannot be called; use a function instead, e.g. `max(x)` rather than `x.max()`."
            raise self._refuse(node, f"a call of `{_source(self.text, node.func)}`", hint)
        function = FUNCTIONS.get(node.func.id)
        if function is None:
            hint = (
                f"{did_you_mean(node.func.id, list(FUNCTIONS))} Available functions: {', '.join(FUNCTIONS)}."
            )
            column = _column(self.text, node)
            problem = f"calls {node.func.id!r} at column {column}, which is not an expectation function"
            raise self._error(problem, column, hint.strip())
        self._check_arguments(node, node.func.id, function)

    def _check_arguments(self, node: ast.Call, name: str, function: Function) -> None:
        for argument in node.args:
            if isinstance(argument, ast.Starred):
                raise self._refuse(argument, "star unpacking (*x)")
        count, most = len(node.args), function.max_args
        if count < function.min_args or (most is not None and count > most):
            column = _column(self.text, node)
            expected = _arity(function)
            problem = f"calls {name}() with {count} argument(s) at column {column}; it takes {expected}"
            raise self._error(problem, column, f"Usage: {function.usage}.")
        for keyword in node.keywords:
            if keyword.arg is None or keyword.arg not in function.keywords:
                what = (
                    "**keyword unpacking" if keyword.arg is None else f"the keyword argument {keyword.arg}="
                )
                raise self._refuse(keyword, what, f"Usage: {function.usage}.")

    def _operator_column(self, node: ast.BinOp) -> int:
        """Column of the operator itself: the first character between the operands that is not a
        space or a closing parenthesis."""
        start, end = _column(self.text, node.left), _column(self.text, node.right)
        start += len(_source(self.text, node.left))
        for index in range(start - 1, end - 1):
            if self.text[index] not in " )":
                return index + 1
        return start

    # Allowed as they are; their children are checked by the walk.
    def _check_Name(self, node: ast.Name) -> None: ...
    def _check_Subscript(self, node: ast.Subscript) -> None: ...
    def _check_Slice(self, node: ast.Slice) -> None: ...
    def _check_Compare(self, node: ast.Compare) -> None:
        operands = [node.left, *node.comparators]
        for index, op in enumerate(node.ops):
            pair = operands[index : index + 2]
            if isinstance(op, ast.Is | ast.IsNot) and not any(map(_is_singleton, pair)):
                hint = "`is` tests identity; compare values with `==` (use `is` only with None, True, False)."
                raise self._refuse(pair[1], f"`{_COMPARE[type(op)]}` between two values", hint)

    def _check_BoolOp(self, node: ast.BoolOp) -> None: ...
    def _check_List(self, node: ast.List) -> None: ...
    def _check_Tuple(self, node: ast.Tuple) -> None: ...
    def _check_keyword(self, node: ast.keyword) -> None: ...


# --- parsing --------------------------------------------------------------------------------


def _normalize(text: object) -> str:
    """One line, trimmed: YAML block scalars may span lines, and columns then count on one line."""
    if not isinstance(text, str):
        raise ExpressionError(
            f"expectation must be a string, got {type(text).__name__} {text!r}\n"
            f"Write it as text, e.g. `{_EXAMPLE}` (quote it in YAML if it starts with a symbol)."
        )
    line = text.replace("\r", " ").replace("\n", " ").strip()
    if not line:
        raise ExpressionError(f"expectation is empty\nWrite a condition on the results, e.g. `{_EXAMPLE}`.")
    if len(line) > MAX_LENGTH:
        raise ExpressionError(
            f"expectation is {len(line)} characters long, more than the limit of {MAX_LENGTH}\n"
            f"    {line[:60]}...\nSplit it into several expectations."
        )
    return line


def _parse(text: str) -> ast.Expression:
    """Parse ``text`` as one Python expression (syntax only: nothing is compiled or run)."""
    try:
        with warnings.catch_warnings():  # SyntaxWarnings about Python semantics do not apply here
            warnings.simplefilter("ignore")
            return ast.parse(text, mode="eval")
    except SyntaxError as exc:
        column = exc.offset if exc.offset and exc.offset > 0 else len(text) + 1
        hint = f"Write a Python-style condition, e.g. `{_EXAMPLE}`."
        if text[column - 1 : column] == "=" and text[column : column + 1] != "=":
            hint = "To compare, use `==` (a single `=` assigns). " + hint
        message = (exc.msg or "invalid syntax").removesuffix(".")
        raise _located(
            f"expectation does not parse: {message} at column {column}", text, column, hint
        ) from None
    except ValueError as exc:  # e.g. a null byte
        raise ExpressionError(f"expectation does not parse: {exc}\n    {text!r}") from None


def _top_level_names(tree: ast.AST) -> list[ast.Name]:
    """Name nodes that refer to the namespace (not the function of a call), in reading order."""
    functions = {id(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    names = [n for n in ast.walk(tree) if isinstance(n, ast.Name) and id(n) not in functions]
    return sorted(names, key=lambda n: n.col_offset)


_LITERAL_NODES = (
    ast.Constant,
    ast.BinOp,
    ast.UnaryOp,
    ast.List,
    ast.Tuple,
    ast.operator,
    ast.unaryop,
    ast.expr_context,
)


def _literal_operations(node: ast.AST) -> Iterator[ast.AST]:
    """The largest operations made only of literals (``10**10**10``, ``'a' * 10**9``, ``1/0``)."""
    if isinstance(node, ast.BinOp) and all(isinstance(n, _LITERAL_NODES) for n in ast.walk(node)):
        yield node
        return
    for child in ast.iter_child_nodes(node):
        yield from _literal_operations(child)


def _check_constants(text: str, tree: ast.Expression) -> None:
    """Compute the literal-only parts now, so that ``runner validate`` refuses ``10**10**10``."""
    for node in _literal_operations(tree.body):
        try:
            _Evaluator(text, {}).evaluate(node)
        except _LocatedError as exc:
            headline = f"expectation cannot compute `{exc.source}` at column {exc.column}: {exc.reason}"
            hint = "Literal parts of an expectation are computed when it is checked; change the numbers."
            raise _located(headline, text, exc.column, hint) from None


def parse_expression(text: str) -> Expression:
    """Parse and check an expectation without reading any result.

    Only parts made of literals are computed (so ``10**10**10`` and ``1/0`` are refused here, where
    ``runner validate`` sees them); nothing is compiled or run.

    Raises:
        ExpressionError: the text does not parse (the message points at the column with a caret),
            or it uses something outside the language (a lambda, a comprehension, a private
            attribute, a call of a function not in :data:`FUNCTIONS`, ...), or it is too long.
    """
    return Expression(text)


@dataclass(frozen=True)
class Expression:
    """A parsed, checked expectation; build it with :func:`parse_expression`.

    Attributes:
        text: the expression as written, on one line and trimmed.
    """

    text: str
    _tree: ast.Expression = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        text = _normalize(self.text)
        tree = _parse(text)
        _Checker(text).check(tree.body)
        _check_constants(text, tree)
        object.__setattr__(self, "text", text)
        object.__setattr__(self, "_tree", tree)

    def __str__(self) -> str:
        return self.text

    def names(self) -> set[str]:
        """The namespace names the expression reads (``layers`` in ``layers[5].x``; not functions)."""
        return {node.id for node in _top_level_names(self._tree)}

    def check_names(self, available: Iterable[str]) -> None:
        """Raise :class:`ExpressionError` if a name is not in ``available``, suggesting close ones.

        For validators that know a step's result names before anything runs.
        """
        known = sorted(set(available))
        for node in _top_level_names(self._tree):
            if node.id not in known:
                column = _column(self.text, node)
                hint = f"{did_you_mean(node.id, known)} Available names: {', '.join(known) or '(none)'}."
                raise _located(
                    f"expectation uses unknown name {node.id!r} at column {column}",
                    self.text,
                    column,
                    hint.strip(),
                )

    def evaluate(self, namespace: Mapping[str, Any]) -> Outcome:
        """Evaluate against ``namespace``; never raises for bad data (see :attr:`Outcome.error`)."""
        evaluator = _Evaluator(self.text, namespace)
        value: Any = None
        passed, error = False, None
        try:
            with np.errstate(all="ignore"):  # inf and nan are values to compare, not warnings
                value = evaluator.evaluate(self._tree.body)
                passed = _truth(value, self.text)
        except _EvaluationError as exc:
            value, error = None, str(exc)
        explanation = _Explainer(self.text, evaluator.values).explain(self._tree.body, error)
        return Outcome(passed=passed, value=_to_python(value), explanation=explanation, error=error)


@dataclass(frozen=True)
class Outcome:
    """The result of evaluating an expectation.

    Attributes:
        passed: whether the final value is true.
        value: the final value (``None`` when evaluation failed).
        explanation: pytest-style: ``assert <expression>``, the same with values substituted, and
            a ``where`` line per sub-expression; ends with the error when there is one.
        error: why evaluation failed (missing key, type error, ...), naming the sub-expression;
            the expectation then counts as failed, and the run goes on.
    """

    passed: bool
    value: Any
    explanation: str
    error: str | None = None


# --- evaluation -----------------------------------------------------------------------------


class _Evaluator:
    """Evaluates a checked tree against a namespace, recording each sub-expression's value."""

    def __init__(self, text: str, namespace: Mapping[str, Any]) -> None:
        self.text = text
        self.namespace = namespace
        self.values: dict[int, Any] = {}

    def evaluate(self, node: ast.AST) -> Any:
        try:
            value = getattr(self, f"_eval_{type(node).__name__}")(node)
        except _LocatedError:
            raise
        except _EvaluationError as exc:
            raise self._error(node, str(exc)) from None
        # Values come from analyses and their objects may raise anything (a property, a pandas
        # lookup): report it on the expectation instead of crashing the run.
        except Exception as exc:
            raise self._error(node, f"{type(exc).__name__}: {exc}") from None
        self.values[id(node)] = value
        return value

    def _error(self, node: ast.AST, reason: str) -> _LocatedError:
        source, column = _source(self.text, node), _column(self.text, node)
        error = _LocatedError(f"could not evaluate `{source}` (column {column}): {reason}")
        error.source, error.column, error.reason = source, column, reason
        return error

    def _eval_Constant(self, node: ast.Constant) -> Any:
        return node.value

    def _eval_Name(self, node: ast.Name) -> Any:
        if node.id in self.namespace:
            return self.namespace[node.id]
        known = sorted(self.namespace)
        suggestion = did_you_mean(node.id, known)
        raise _EvaluationError(
            f"unknown name {node.id!r}.{suggestion} Available names: {_shorten_list(known)}."
        )

    def _eval_Attribute(self, node: ast.Attribute) -> Any:
        return _attribute(self.evaluate(node.value), node.attr)

    def _eval_Subscript(self, node: ast.Subscript) -> Any:
        return _item(self.evaluate(node.value), self.evaluate(node.slice))

    def _eval_Slice(self, node: ast.Slice) -> slice:
        return slice(
            *(None if part is None else self.evaluate(part) for part in (node.lower, node.upper, node.step))
        )

    def _eval_List(self, node: ast.List) -> list[Any]:
        return [self.evaluate(element) for element in node.elts]

    def _eval_Tuple(self, node: ast.Tuple) -> tuple[Any, ...]:
        return tuple(self.evaluate(element) for element in node.elts)

    def _eval_UnaryOp(self, node: ast.UnaryOp) -> Any:
        operand = self.evaluate(node.operand)
        if isinstance(node.op, ast.Not):
            return not _truth(operand, _source(self.text, node.operand))
        return -operand if isinstance(node.op, ast.USub) else +operand

    def _eval_BinOp(self, node: ast.BinOp) -> Any:
        left, right = self.evaluate(node.left), self.evaluate(node.right)
        return _BINARY[type(node.op)][1](left, right)

    def _eval_BoolOp(self, node: ast.BoolOp) -> Any:
        stop_when = not isinstance(node.op, ast.And)  # `and` stops at a false operand, `or` at a true one
        value = None
        for operand in node.values:
            value = self.evaluate(operand)
            if _truth(value, _source(self.text, operand)) == stop_when:
                break
        return value

    def _eval_Compare(self, node: ast.Compare) -> Any:
        left, result = self.evaluate(node.left), True
        for op, comparator in zip(node.ops, node.comparators, strict=True):
            right = self.evaluate(comparator)
            outcome = _compare(op, left, right)
            # Arrays compare elementwise, so `0 < x <= 1` on an array is an array (for all/any).
            result = outcome if result is True else np.logical_and(result, outcome)
            if not isinstance(result, np.ndarray) and not result:
                break
            left = right
        return result

    def _eval_Call(self, node: ast.Call) -> Any:
        function = FUNCTIONS[node.func.id]  # type: ignore[attr-defined]  # checked at parse time
        args = [self.evaluate(argument) for argument in node.args]
        kwargs = {str(keyword.arg): self.evaluate(keyword.value) for keyword in node.keywords}
        return function.impl(*args, **kwargs)


class _LocatedError(_EvaluationError):
    """An evaluation error whose message already names the failing sub-expression."""

    source = ""
    column = 0
    reason = ""


def _truth(value: Any, source: str) -> bool:
    """``bool(value)``, refusing arrays of several values (say which function to wrap them in)."""
    if isinstance(value, np.ndarray) and value.size != 1:
        raise _LocatedError(
            f"`{source}` is an array of {value.size} values, which is neither true nor false; "
            f"write `all({source})` or `any({source})`"
        )
    try:
        return bool(value)
    except Exception as exc:  # e.g. pandas: "The truth value of a Series is ambiguous"
        raise _LocatedError(
            f"`{source}` has no single truth value ({exc}); write `all({source})` or `any({source})`"
        ) from None


_INTEGER = re.compile(r"-?[0-9]+")


def _key_variants(key: Any) -> list[Any]:
    """``key`` and its JSON twin: a dict written to JSON and read back has string keys."""
    if isinstance(key, int | np.integer) and not isinstance(key, bool):
        return [key, str(key)]
    if isinstance(key, str) and _INTEGER.fullmatch(key):
        return [key, int(key)]
    return [key]


def _lookup(mapping: Mapping[Any, Any], key: Any) -> Any:
    for candidate in _key_variants(key):
        if candidate in mapping:
            return mapping[candidate]
    keys = [str(k) for k in mapping]
    raise _EvaluationError(
        f"no key {key!r}.{did_you_mean(str(key), keys)} Available keys: {_shorten_list(keys) or '(none)'}."
    )


def _attribute(obj: Any, name: str) -> Any:
    """``obj.name``: a dict's key, or a public, non-callable attribute of anything else."""
    if isinstance(obj, Mapping):
        return _lookup(obj, name)
    if name.startswith("_"):
        raise _EvaluationError(f"the private attribute {name!r} cannot be read")
    try:
        value = getattr(obj, name)
    except AttributeError:
        raise _EvaluationError(f"{type(obj).__name__} has no attribute {name!r}") from None
    if callable(value):
        instead = f"; write `{name}(...)` instead" if name in FUNCTIONS else ""
        raise _EvaluationError(
            f"{name!r} is a method of {type(obj).__name__}, and methods cannot be called{instead}"
        )
    return value


def _item(obj: Any, key: Any) -> Any:
    """``obj[key]``, with dict keys matched as int or string and clear out-of-range messages."""
    if isinstance(obj, Mapping):
        return _lookup(obj, key)
    try:
        return obj[key]
    except IndexError:
        if isinstance(obj, Sequence):
            raise _EvaluationError(
                f"index {key} is out of range for a {type(obj).__name__} of length {len(obj)}"
            ) from None
        raise


def _contains(container: Any, item: Any) -> bool:
    if isinstance(container, Mapping):
        return any(candidate in container for candidate in _key_variants(item))
    return item in container


def _compare(op: ast.cmpop, left: Any, right: Any) -> Any:
    if isinstance(op, ast.In | ast.NotIn):
        return _contains(right, left) == isinstance(op, ast.In)
    if isinstance(op, ast.Is | ast.IsNot):
        return (left is right) == isinstance(op, ast.Is)
    return _COMPARISONS[type(op)](left, right)


_COMPARISONS: dict[type[ast.cmpop], Callable[[Any, Any], Any]] = {
    ast.Eq: lambda a, b: a == b,
    ast.NotEq: lambda a, b: a != b,
    ast.Lt: lambda a, b: a < b,
    ast.LtE: lambda a, b: a <= b,
    ast.Gt: lambda a, b: a > b,
    ast.GtE: lambda a, b: a >= b,
}


def _is_integer(value: Any) -> bool:
    return isinstance(value, int | np.integer)


def _power(base: Any, exponent: Any) -> Any:
    """``base ** exponent``, refusing integer results too large to compute quickly."""
    if _is_integer(base) and _is_integer(exponent) and exponent > 0 and abs(base) > 1:
        bits = math.log2(abs(int(base))) * int(exponent)
        if bits > MAX_POWER_BITS:
            raise _EvaluationError(
                f"{base} ** {exponent} would have about {bits * math.log10(2):.3g} digits; integer powers "
                f"are limited to {MAX_POWER_BITS} bits (use a float base, e.g. {base}.0 ** {exponent})"
            )
    return base**exponent


def _repeat(a: Any, b: Any) -> Any:
    """``a * b``, refusing a list or string repeated into something huge."""
    for sequence, times in ((a, b), (b, a)):
        if isinstance(sequence, str | list | tuple) and _is_integer(times):
            size = len(sequence) * times
            if size > MAX_SEQUENCE_LENGTH:
                kind = type(sequence).__name__
                raise _EvaluationError(
                    f"a {kind} of {size} elements is over the limit of {MAX_SEQUENCE_LENGTH}"
                )
    return a * b


def _modulo(a: Any, b: Any) -> Any:
    if isinstance(a, str):
        raise _EvaluationError("`%` string formatting is not supported; compare the string itself")
    return a % b


# --- explanation ----------------------------------------------------------------------------

_MAX_ITEMS = 8
_MAX_KEYS = 6
_MAX_REPR = 80


def _shorten(text: str, limit: int = _MAX_REPR) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _shorten_list(names: Sequence[str], limit: int = 30) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _format_float(value: float) -> str:
    """Up to 6 significant digits, still looking like a float (``3.0``, not ``3``)."""
    text = f"{value:.6g}"
    return text + ".0" if text.lstrip("-").isdigit() else text


def _format_int(value: int) -> str:
    if value.bit_length() > 1000:  # str() refuses ints past 4300 digits, and nobody reads them
        return f"<int of about {value.bit_length() * math.log10(2):.0f} digits>"
    return _shorten(str(value), 40)


def _format_sequence(values: Sequence[Any], depth: int) -> str:
    brackets = "[]" if isinstance(values, list) else "()"
    if depth > 2:
        return f"{brackets[0]}...{brackets[1]}"
    items = [_format_value(item, depth + 1) for item in values[:_MAX_ITEMS]]
    if len(values) > _MAX_ITEMS:
        items.append(f"... ({len(values)} items)")
    trailing = "," if len(values) == 1 and brackets == "()" else ""
    return f"{brackets[0]}{', '.join(items)}{trailing}{brackets[1]}"


def _format_mapping(values: Mapping[Any, Any], depth: int) -> str:
    if depth > 2:
        return "{...}"
    items = [f"{k!r}: {_format_value(v, depth + 1)}" for k, v in list(values.items())[:_MAX_KEYS]]
    if len(values) > _MAX_KEYS:
        items.append(f"... ({len(values)} keys)")
    return "{" + ", ".join(items) + "}"


def _format_array(values: np.ndarray) -> str:
    if values.ndim == 0:
        return f"array({_format_value(values.item())})"
    items = ", ".join(_format_value(item) for item in values.ravel()[:_MAX_ITEMS].tolist())
    if values.ndim == 1 and values.size <= _MAX_ITEMS:
        return f"array([{items}])"
    more = ", ..." if values.size > _MAX_ITEMS else ""
    return f"array([{items}{more}], shape={values.shape})"


def _format_value(value: Any, depth: int = 0) -> str:
    """A short, readable rendering: floats to 6 significant digits, long lists and arrays cut."""
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, int | np.integer):
        return _format_int(int(value))
    if isinstance(value, float | np.floating):
        return _format_float(float(value))
    if isinstance(value, str):
        return _shorten(repr(value), 60)
    if isinstance(value, np.ndarray):
        return _format_array(value)
    if isinstance(value, Mapping):
        return _shorten(_format_mapping(value, depth), 200)
    if isinstance(value, list | tuple):
        return _shorten(_format_sequence(value, depth), 200)
    try:
        return _shorten(repr(value))
    except Exception:  # a broken __repr__ must not hide the expectation's result
        return f"<{type(value).__name__} object>"


_TERMINALS = (ast.Name, ast.Attribute, ast.Subscript, ast.Call)
_COMPOUND = (ast.BoolOp, ast.Compare, ast.BinOp)


def _explained_children(node: ast.AST) -> list[ast.AST]:
    """Sub-expressions of a terminal worth their own ``where`` line: call arguments, indexes."""
    if isinstance(node, ast.Call):
        return [*node.args, *(keyword.value for keyword in node.keywords)]
    if isinstance(node, ast.Subscript):
        return [node.slice]
    return []


class _Explainer:
    """Renders an evaluated tree like pytest's assertion rewriting."""

    def __init__(self, text: str, values: Mapping[int, Any]) -> None:
        self.text = text
        self.values = values
        self.where: list[tuple[int, str, str]] = []  # (nesting, value, source)
        self.seen: set[str] = set()

    def explain(self, root: ast.AST, error: str | None) -> str:
        lines = [f"assert {self.text}"]
        substituted = self.substitute(root, 0)
        if substituted != self.text:
            lines.append(f"assert {substituted}")
        lines += self._where_lines()
        if error:
            lines.append(error)
        return "\n".join(lines)

    def substitute(self, node: ast.AST, depth: int) -> str:
        """``node`` as written, with each evaluated name, attribute, index and call replaced by its value."""
        if isinstance(node, _TERMINALS):
            return self._terminal(node, depth)
        render = getattr(self, f"_render_{type(node).__name__}", None)
        return render(node, depth) if render else _source(self.text, node)

    def _terminal(self, node: ast.AST, depth: int) -> str:
        source = _source(self.text, node)
        if id(node) not in self.values:
            return source
        shown = _format_value(self.values[id(node)])
        if source not in self.seen and shown != source:
            self.seen.add(source)
            self.where.append((depth, shown, source))
            for child in _explained_children(node):
                self.substitute(child, depth + 1)
        return shown

    def _nested(self, node: ast.AST, depth: int) -> str:
        text = self.substitute(node, depth)
        return f"({text})" if isinstance(node, _COMPOUND) else text

    def _render_Compare(self, node: ast.Compare, depth: int) -> str:
        parts = [self._nested(node.left, depth)]
        for op, comparator in zip(node.ops, node.comparators, strict=True):
            parts += [_COMPARE[type(op)], self._nested(comparator, depth)]
        return " ".join(parts)

    def _render_BoolOp(self, node: ast.BoolOp, depth: int) -> str:
        # Like pytest: the operands that were evaluated; the last one decided the result.
        evaluated = [operand for operand in node.values if id(operand) in self.values] or node.values
        word = " and " if isinstance(node.op, ast.And) else " or "
        return word.join(self._nested(operand, depth) for operand in evaluated)

    def _render_UnaryOp(self, node: ast.UnaryOp, depth: int) -> str:
        return _UNARY[type(node.op)] + self._nested(node.operand, depth)

    def _render_BinOp(self, node: ast.BinOp, depth: int) -> str:
        symbol = _BINARY[type(node.op)][0]
        return f"{self._nested(node.left, depth)} {symbol} {self._nested(node.right, depth)}"

    def _render_List(self, node: ast.List, depth: int) -> str:
        return "[" + ", ".join(self.substitute(element, depth) for element in node.elts) + "]"

    def _render_Tuple(self, node: ast.Tuple, depth: int) -> str:
        trailing = "," if len(node.elts) == 1 else ""
        return "(" + ", ".join(self.substitute(element, depth) for element in node.elts) + trailing + ")"

    def _where_lines(self) -> list[str]:
        lines, previous = [], -1
        for depth, shown, source in self.where:
            word = "where" if depth > previous else "and  "
            lines.append(f" +  {'  ' * depth}{word} {shown} = {source}")
            previous = depth
        return lines
