"""Read spec files: safe YAML with the position of every key and value, then Pydantic validation.

Loading is separate from interpreting. :func:`read_document` composes YAML nodes (never
constructing arbitrary Python objects: unknown tags are errors) and keeps each node's mark, so
that every problem found later, by Pydantic or by the planner, can be reported as
``specs/x.yaml:12:5: steps[2].params.top_k: ...``.

A spec may come from anyone's branch, and CI and editors validate it, so reading one is bounded:
a file too large, too deep, or whose aliases expand too far (a "billion laughs" document: 9 lines
standing for 10⁹ values) is refused in about a second with a located error, never a hang.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from runner.errors import Location, SpecError, SpecProblem
from runner.registry import did_you_mean
from runner.spec import ExperimentSpec

__all__ = ["SpecDocument", "find_spec_files", "format_loc", "load_spec", "problems_from", "read_document"]

Loc = tuple[str | int, ...]

# The bounds. Each is far past any real spec: the committed ones are under 4 KiB, hold about 100
# values and nest 6 levels deep.
MAX_SPEC_BYTES = 64 * 1024
"""Largest file read. PyYAML's pure-Python parser reads dense YAML (``[1,1,1,...]``) at about
60 KiB/s, so this bounds parsing to about a second; the committed specs read at 400-900 KiB/s."""
MAX_VALUES = 100_000
"""Most values converted, counting each alias as the values it stands for (about 0.5 s of work)."""
MAX_DEPTH = 100
"""Deepest nesting. Composing and converting recurse, 2-4 Python frames a level, and Python stops at 1000."""
MAX_NUMBER_CHARS = 1000
"""Longest number read: Python refuses integers of over 4300 digits, and YAML's base-60 integers
(``1:2:3``) take time quadratic in their length."""

_STANDARD_TAGS = {
    f"tag:yaml.org,2002:{name}" for name in ("str", "int", "float", "bool", "null", "map", "seq", "timestamp")
}


@dataclass
class SpecDocument:
    """A parsed YAML document: plain data plus the 1-based position of each path's value and key."""

    path: str
    text: str
    data: Any
    values: dict[Loc, tuple[int, int]] = field(default_factory=dict)
    keys: dict[Loc, tuple[int, int]] = field(default_factory=dict)
    problems: list[SpecProblem] = field(default_factory=list)
    """Structural problems (duplicate keys, disallowed tags), reported with the validation errors."""

    def locate(self, loc: Loc, *, key: bool = False) -> Location:
        """Position of ``loc`` (its key when ``key``), else of its nearest located ancestor."""
        table = self.keys if key else self.values
        for end in range(len(loc), -1, -1):
            prefix = tuple(loc[:end])
            mark = table.get(prefix) or self.values.get(prefix)
            if mark:
                return Location(self.path, *mark)
        return Location(self.path, 1, 1)

    def problem(self, loc: Loc, message: str, *, key: bool = False) -> SpecProblem:
        """A :class:`SpecProblem` located at ``loc``."""
        return SpecProblem(self.locate(loc, key=key), format_loc(loc), message)


def format_loc(loc: Loc) -> str:
    """``("steps", 2, "params", "top_k")`` → ``steps[2].params.top_k``; keys past 100 characters shortened."""
    out = ""
    for part in loc:
        name = _shorten(str(part), 100)
        out += f"[{part}]" if isinstance(part, int) else (f".{name}" if out else name)
    return out


def find_spec_files(paths: list[Path]) -> list[Path]:
    """Expand directories into their ``*.yaml`` / ``*.yml`` files, recursively and sorted."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.suffix in {".yaml", ".yml"} and p.is_file()))
        else:
            found.append(path)
    return found


def read_document(path: Path, display: str | None = None) -> SpecDocument:
    """Read and compose ``path`` as one YAML mapping, or raise :class:`SpecError` if it is not one.

    Duplicate keys and disallowed tags do not raise here: they are kept in ``problems`` so that
    they are reported together with the validation errors of the same file. A file past one of the
    bounds (``MAX_SPEC_BYTES``, ``MAX_DEPTH``, ``MAX_VALUES``) raises at once, located.
    """
    shown = display or str(path)
    text = _decode(_read(path, shown), shown)
    doc = SpecDocument(shown, text, None)
    node = _compose(text, shown)
    if node is None:
        raise SpecError(
            [SpecProblem(Location(shown, 1, 1), "", "the file is empty; a spec is a YAML mapping")],
            hint="Start from one of the examples in specs/.",
        )
    if not isinstance(node, yaml.MappingNode):
        kind = "a list" if isinstance(node, yaml.SequenceNode) else "a single value"
        raise SpecError(
            [SpecProblem(Location(shown, *_position(node)), "", f"a spec must be a YAML mapping, not {kind}")]
        )
    try:
        doc.data = _Converter(doc).convert(node, ())
    except RecursionError:  # a safety net: MAX_DEPTH keeps the walk far from Python's limit
        raise SpecError([SpecProblem(Location(shown), "", _TOO_DEEP)], hint=_DEPTH_HINT) from None
    return doc


def _read(path: Path, shown: str) -> bytes:
    # Read one byte past the bound, not the whole file: it may be huge, or endless like /dev/zero.
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_SPEC_BYTES + 1)
    except OSError as exc:
        raise SpecError([SpecProblem(Location(shown), "", f"cannot read file: {exc.strerror}")]) from None
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError(
            [SpecProblem(Location(shown), "", f"the file is larger than {MAX_SPEC_BYTES // 1024} KiB")],
            hint=_SIZE_HINT,
        )
    return raw


def _decode(raw: bytes, shown: str) -> str:
    if b"\x00" in raw:
        raise SpecError([SpecProblem(Location(shown), "", "this is a binary file, not YAML text")])
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise SpecError(
            [SpecProblem(Location(shown, line), "", f"not UTF-8 text (byte 0x{raw[exc.start]:02x})")]
        ) from None


def _compose(text: str, shown: str) -> yaml.Node | None:
    try:
        loader = _SpecLoader(text, shown)
    except yaml.reader.ReaderError as exc:  # raised while checking the text, before parsing
        raise SpecError([_control_character(exc, text, shown)]) from None
    try:
        return loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (None, None)
        message = _yaml_message(exc)
        raise SpecError([SpecProblem(Location(shown, line, col), "", message)]) from None
    except yaml.YAMLError as exc:
        raise SpecError([SpecProblem(Location(shown), "", f"invalid YAML: {exc}")]) from None
    except RecursionError:  # a safety net: MAX_DEPTH keeps composing far from Python's limit
        mark = loader.get_mark()
        raise SpecError(
            [SpecProblem(Location(shown, mark.line + 1, mark.column + 1), "", _TOO_DEEP)], hint=_DEPTH_HINT
        ) from None
    finally:
        loader.dispose()


def _yaml_message(exc: yaml.MarkedYAMLError) -> str:
    problem = exc.problem or str(exc)
    if "'\\t'" in problem:
        return "a tab character; YAML indentation must use spaces"
    if "expected a single document" in (exc.context or "") or "but found another document" in problem:
        return "more than one YAML document (---); a spec file holds exactly one"
    if "found duplicate anchor" in (exc.context or "") and exc.context_mark:
        name = (exc.context or "").split("'")[1]
        return f"the anchor &{name} is defined twice (first at line {exc.context_mark.line + 1}); rename one"
    context = f" ({exc.context})" if exc.context else ""
    return f"invalid YAML: {problem}{context}"


def _position(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _control_character(exc: yaml.reader.ReaderError, text: str, shown: str) -> SpecProblem:
    line = text.count("\n", 0, exc.position) + 1
    column = exc.position - text.rfind("\n", 0, exc.position)
    message = f"a character that YAML does not allow (U+{exc.character:04X}); delete it"
    return SpecProblem(Location(shown, line, column), "", message)


class _Alias(yaml.Node):
    """A use of an anchor (``*name``): where it is written, and the node it stands for.

    PyYAML returns the anchored node itself for every alias, which would lose the alias's position;
    this keeps it, both to locate the value and to name the alias that expands too far.
    """

    def __init__(self, target: yaml.Node, event: yaml.AliasEvent) -> None:
        super().__init__(target.tag, target.value, None, None)
        self.start_mark, self.end_mark = event.start_mark, event.end_mark
        self.target = target
        self.name = event.anchor


class _SpecLoader(yaml.SafeLoader):
    """PyYAML's safe composer, refusing nesting past ``MAX_DEPTH`` and keeping aliases as :class:`_Alias`."""

    def __init__(self, text: str, shown: str) -> None:
        super().__init__(text)
        self.shown = shown
        self.depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            target = super().compose_node(parent, index)  # raises for an undefined alias
            return _Alias(target, event) if target is not None else None
        if self.depth >= MAX_DEPTH:
            line, col = event.start_mark.line + 1, event.start_mark.column + 1
            raise SpecError([SpecProblem(Location(self.shown, line, col), "", _TOO_DEEP)], hint=_DEPTH_HINT)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


_SIZE_HINT = "A spec is a few KiB of YAML; keep data (prompts, tables) in a file the spec names."
_TOO_DEEP = f"values nest more than {MAX_DEPTH} levels deep"
_DEPTH_HINT = "A spec nests a few levels; write the values out flatter, or use fewer aliases."
_EXPANSION_HINT = (
    "Each alias repeats every value of its anchor, so aliases of lists of aliases multiply "
    '(a "billion laughs" document). Write the values out, or use fewer aliases.'
)
_MERGE_TAG = "tag:yaml.org,2002:merge"
_KINDS = {
    "int": "an integer",
    "float": "a number",
    "bool": "a boolean",
    "null": "null",
    "timestamp": "a date",
    "str": "text",
    "seq": "a list",
    "map": "a mapping",
}


class _Converter:
    """Composed nodes → plain data, recording where each path is written.

    Bounded: an alias is converted once per use, so it counts the values it stands for against
    ``MAX_VALUES`` and the levels it adds against ``MAX_DEPTH``; an alias inside its own anchor is
    a problem, not an endless walk.
    """

    def __init__(self, doc: SpecDocument) -> None:
        self.doc = doc
        self.count = 0
        self.depth = 0
        self.open: set[int] = set()
        """``id`` of each collection being converted: an alias to one of them is a cycle."""
        self.alias: tuple[_Alias, Loc] | None = None
        """The outermost alias being expanded (and its path): what the bounds blame."""

    def convert(self, node: yaml.Node, loc: Loc, *, at: tuple[int, int] | None = None) -> Any:
        """The value of ``node`` at ``loc``, located at ``at`` (an alias's position) else where written."""
        if isinstance(node, _Alias):
            return self._expand(node, loc)
        self.doc.values[loc] = at or _position(node)
        self.count += 1
        if self.count > MAX_VALUES:
            hint = _EXPANSION_HINT if self.alias else _SIZE_HINT
            raise self._refusal(loc, f"the spec holds more than {MAX_VALUES:,} values", hint)
        if node.tag not in _STANDARD_TAGS:
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            message = f"the YAML tag {tag} is not allowed; specs hold plain data only (it was not executed)"
            self.doc.problems.append(self.doc.problem(loc, message))
            return None
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node, loc)
        if self.depth >= MAX_DEPTH:
            raise self._refusal(loc, _TOO_DEEP, _DEPTH_HINT)
        self.depth += 1
        self.open.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, loc)
            return [self.convert(item, (*loc, i)) for i, item in enumerate(node.value)]
        finally:
            self.open.discard(id(node))
            self.depth -= 1

    def _expand(self, alias: _Alias, loc: Loc) -> Any:
        if id(alias.target) in self.open:
            self.doc.values[loc] = _position(alias)
            message = (
                f"the alias *{alias.name} is inside its own anchor, so it never ends; write the values out"
            )
            self.doc.problems.append(self.doc.problem(loc, message))
            return None
        outer = self.alias
        self.alias = outer or (alias, loc)
        try:
            return self.convert(alias.target, loc, at=_position(alias))
        finally:
            self.alias = outer

    def _refusal(self, loc: Loc, message: str, hint: str) -> SpecError:
        if self.alias is None:
            return SpecError([self.doc.problem(loc, message)], hint=hint)
        alias, alias_loc = self.alias
        where = Location(self.doc.path, *_position(alias))
        problem = SpecProblem(
            where, format_loc(alias_loc), f"the alias *{alias.name} expands so that {message}"
        )
        return SpecError([problem], hint=hint)

    def _scalar(self, node: yaml.ScalarNode, loc: Loc) -> Any:
        try:
            value = _construct(node)
        except ValueError as exc:
            self.doc.problems.append(self.doc.problem(loc, str(exc)))
            return None
        return value.isoformat() if hasattr(value, "isoformat") else value

    def _mapping(self, node: yaml.MappingNode, loc: Loc) -> dict[str, Any]:
        merged = self._merged([value for key, value in node.value if key.tag == _MERGE_TAG], loc)
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = None if key_node.tag == _MERGE_TAG else self._key(key_node, loc)
            if key is None:
                continue
            mark = _position(key_node)
            if key in out:
                first = self.doc.keys[(*loc, key)]
                message = (
                    f"duplicate key (first defined at line {first[0]}); "
                    "YAML would silently keep only the last one"
                )
                self.doc.problems.append(
                    SpecProblem(Location(self.doc.path, *mark), format_loc((*loc, key)), message)
                )
                continue
            self.doc.keys[(*loc, key)] = mark
            out[key] = self.convert(value_node, (*loc, key))
        return {**merged, **out}  # the mapping's own keys win over merged ones, in YAML's order

    def _key(self, node: yaml.Node, loc: Loc) -> str | None:
        target = _target(node)
        where = Location(self.doc.path, *_position(node))
        message = "keys must be plain scalars"
        if isinstance(target, yaml.ScalarNode) and target.tag in _STANDARD_TAGS:
            try:
                return str(_construct(target))
            except ValueError as exc:
                message = str(exc)
        self.doc.problems.append(SpecProblem(where, format_loc(loc), message))
        return None

    def _merged(self, sources: list[yaml.Node], loc: Loc) -> dict[str, Any]:
        """The keys that ``<<: *defaults`` (or ``<<: [*a, *b]``) bring in; earlier mappings win."""
        mappings: list[yaml.Node] = []
        for source in sources:
            target = _target(source)
            items = target.value if isinstance(target, yaml.SequenceNode) else [source]
            if all(isinstance(_target(item), yaml.MappingNode) for item in items):
                mappings.extend(items)
            else:
                message = "a merge key (<<) takes a mapping or a list of mappings, such as *defaults"
                self.doc.problems.append(
                    SpecProblem(Location(self.doc.path, *_position(source)), format_loc(loc), message)
                )
        here = self.doc.values[loc]
        merged: dict[str, Any] = {}
        for mapping in reversed(mappings):  # the first mapping converted last: its values and positions stay
            value = self.convert(mapping, loc)
            if isinstance(value, dict):  # None: a cycle, already reported
                merged.update(value)
        self.doc.values[loc] = here
        return merged


def _construct(node: yaml.ScalarNode) -> Any:
    """The value of a scalar, or a ValueError whose message says why it cannot be read."""
    kind = node.tag.removeprefix("tag:yaml.org,2002:")
    if kind in {"int", "float"} and len(node.value) > MAX_NUMBER_CHARS:
        raise ValueError(f"a number {len(node.value):,} characters long; quote it if it is meant as text")
    try:
        return yaml.constructor.SafeConstructor().construct_object(node)
    # PyYAML's constructors fail with whatever their parsing raises: int("x"), a dict lookup, a
    # regex that did not match (AttributeError), datetime(2024, 13, 45)...
    except (ValueError, ArithmeticError, LookupError, AttributeError, yaml.YAMLError) as exc:
        detail = f" ({exc})" if kind == "timestamp" and type(exc) is ValueError else ""
        message = f"cannot read {_shorten(node.value)!r} as {_KINDS.get(kind, kind)}{detail}"
        raise ValueError(f"{message}; fix it, or quote it to keep it as text") from None


def _target(node: yaml.Node) -> yaml.Node:
    return node.target if isinstance(node, _Alias) else node


def _shorten(text: str, width: int = 60) -> str:
    return text if len(text) <= width else f"{text[: width - 1]}…"


def problems_from(
    error: ValidationError, doc: SpecDocument, model: type[BaseModel], prefix: Loc = ()
) -> list[SpecProblem]:
    """Turn each Pydantic error into a located :class:`SpecProblem`, with did-you-mean for unknown keys."""
    problems = []
    for err in error.errors(include_url=False):
        rel = tuple(err["loc"])
        loc = (*prefix, *rel)
        if err["type"] == "extra_forbidden":
            fields = fields_at(model, rel[:-1])
            known = f" Known fields: {', '.join(fields)}." if fields else ""
            message = f"unknown field.{did_you_mean(str(rel[-1]), fields)}{known}"
            problems.append(doc.problem(loc, message, key=True))
        elif err["type"] == "missing":
            problems.append(doc.problem(loc, "required field is missing"))
        else:
            problems.append(doc.problem(loc, _clean_message(err)))
    return problems


def _clean_message(err: Any) -> str:
    message = str(err["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    if (
        err["type"] not in {"value_error", "assertion_error"}
        and "input" in err
        and not isinstance(err["input"], dict | list)
    ):
        message += f" (got {_shorten(repr(err['input']))})"
    return message


def fields_at(model: type[BaseModel], loc: Loc) -> list[str]:
    """The field names of the model reached by following ``loc`` from ``model`` (or [])."""
    annotation: Any = model
    for part in loc:
        annotation = _step_into(annotation, part)
        if annotation is None:
            return []
    target = _unwrap_model(annotation)
    return list(target.model_fields) if target else []


def _step_into(annotation: Any, part: str | int) -> Any:
    target = _unwrap_model(annotation)
    if target is not None:
        info = target.model_fields.get(str(part))
        return info.annotation if info else None
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (list, tuple) and args:
        return args[0]
    if origin is dict and len(args) == 2:
        return args[1]
    return None


def _unwrap_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _unwrap_model(arg)
            if found:
                return found
    return None


def load_spec(
    path: Path, display: str | None = None, *, document: SpecDocument | None = None
) -> tuple[ExperimentSpec, SpecDocument]:
    """Read (unless ``document`` is given) and validate the top-level spec; params are the planner's."""
    doc = document or read_document(path, display)
    try:
        spec = ExperimentSpec.model_validate(doc.data)
    except ValidationError as exc:
        raise SpecError(sort_problems([*doc.problems, *problems_from(exc, doc, ExperimentSpec)])) from None
    if doc.problems:
        raise SpecError(doc.problems)
    return spec, doc


def sort_problems(problems: list[SpecProblem]) -> list[SpecProblem]:
    """Problems in file order."""
    return sorted(problems, key=lambda p: (p.location.line or 0, p.location.column or 0))
