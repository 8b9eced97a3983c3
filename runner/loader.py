"""Read spec files: safe YAML with the position of every key and value, then Pydantic validation.

Loading is separate from interpreting. :func:`read_document` composes YAML nodes (never
constructing arbitrary Python objects: unknown tags are errors) and keeps each node's mark, so
that every problem found later, by Pydantic or by the planner, can be reported as
``specs/x.yaml:12:5: steps[2].params.top_k: ...``.
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
    """``("steps", 2, "params", "top_k")`` → ``steps[2].params.top_k``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
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
    they are reported together with the validation errors of the same file.
    """
    shown = display or str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SpecError([SpecProblem(Location(shown), "", f"cannot read file: {exc.strerror}")]) from None
    text = _decode(raw, shown)
    doc = SpecDocument(shown, text, None)
    node = _compose(text, shown)
    if node is None:
        raise SpecError(
            [SpecProblem(Location(shown, 1, 1), "", "the file is empty; a spec is a YAML mapping")],
            hint="Start from one of the examples in specs/.",
        )
    if not isinstance(node, yaml.MappingNode):
        line, col = node.start_mark.line + 1, node.start_mark.column + 1
        kind = "a list" if isinstance(node, yaml.SequenceNode) else "a single value"
        raise SpecError(
            [SpecProblem(Location(shown, line, col), "", f"a spec must be a YAML mapping, not {kind}")]
        )
    doc.data = _to_python(node, (), doc, doc.problems)
    return doc


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
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (None, None)
        message = _yaml_message(exc)
        raise SpecError([SpecProblem(Location(shown, line, col), "", message)]) from None
    except yaml.YAMLError as exc:
        raise SpecError([SpecProblem(Location(shown), "", f"invalid YAML: {exc}")]) from None


def _yaml_message(exc: yaml.MarkedYAMLError) -> str:
    problem = exc.problem or str(exc)
    if "'\\t'" in problem:
        return "a tab character; YAML indentation must use spaces"
    if "expected a single document" in (exc.context or "") or "but found another document" in problem:
        return "more than one YAML document (---); a spec file holds exactly one"
    context = f" ({exc.context})" if exc.context else ""
    return f"invalid YAML: {problem}{context}"


def _to_python(node: yaml.Node, loc: Loc, doc: SpecDocument, problems: list[SpecProblem]) -> Any:
    doc.values[loc] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if node.tag not in _STANDARD_TAGS:
        problems.append(
            doc.problem(
                loc,
                f"the YAML tag {node.tag.replace('tag:yaml.org,2002:', '!!')} is not "
                "allowed; specs hold plain data only (it was not executed)",
            )
        )
        return None
    if isinstance(node, yaml.MappingNode):
        return _mapping(node, loc, doc, problems)
    if isinstance(node, yaml.SequenceNode):
        return [_to_python(item, (*loc, i), doc, problems) for i, item in enumerate(node.value)]
    value = yaml.constructor.SafeConstructor().construct_object(node)
    return value.isoformat() if hasattr(value, "isoformat") else value


def _mapping(
    node: yaml.MappingNode, loc: Loc, doc: SpecDocument, problems: list[SpecProblem]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key_node, value_node in node.value:
        mark = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag not in _STANDARD_TAGS:
            problems.append(
                SpecProblem(Location(doc.path, *mark), format_loc(loc), "keys must be plain scalars")
            )
            continue
        key = str(yaml.constructor.SafeConstructor().construct_object(key_node))
        if key in out:
            first = doc.keys[(*loc, key)]
            problems.append(
                SpecProblem(
                    Location(doc.path, *mark),
                    format_loc((*loc, key)),
                    f"duplicate key (first defined at line {first[0]}); YAML would silently "
                    "keep only the last one",
                )
            )
            continue
        doc.keys[(*loc, key)] = mark
        out[key] = _to_python(value_node, (*loc, key), doc, problems)
    return out


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
        message += f" (got {err['input']!r})"
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
