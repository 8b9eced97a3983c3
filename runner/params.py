"""Parameter types shared by analyses' params models.

``Indices`` reads the seed scripts' range syntax (``"0-23"``, ``"0,5,10"``, ``"0-10,50-60"``) as well
as YAML ints and lists, and keeps the text as written so case ids stay readable.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

__all__ = ["Indices", "parse_indices"]


def parse_indices(value: Any) -> tuple[int, ...]:
    """``"0-3,7"`` → ``(0, 1, 2, 3, 7)``; also accepts an int or a list of ints/ranges.

    Order is kept and duplicates are dropped. Raises ``ValueError`` with the offending part.
    """
    if isinstance(value, bool):
        raise ValueError("expected indices such as 5, [0, 5, 10], '0-23' or '0,5,10', got a boolean")
    if isinstance(value, int):
        parts: list[Any] = [value]
    elif isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
    elif isinstance(value, list | tuple):
        parts = list(value)
    else:
        raise ValueError(f"expected indices such as '0-23' or [0, 5, 10], got {value!r}")
    out: dict[int, None] = {}
    for part in parts:
        for index in _expand(part):
            out[index] = None
    if not out:
        raise ValueError("expected at least one index")
    return tuple(out)


def _expand(part: Any) -> range | list[int]:
    if isinstance(part, int) and not isinstance(part, bool):
        if part < 0:
            raise ValueError(f"indices must be >= 0, got {part}")
        return [part]
    text = str(part).strip()
    lo, sep, hi = text.partition("-")
    if not (lo.strip().isdigit() and (not sep or hi.strip().isdigit())):
        raise ValueError(f"cannot read {text!r} as an index or a range like '0-23'")
    start, stop = int(lo), int(hi) if sep else int(lo)
    if stop < start:
        raise ValueError(f"range {text!r} runs backwards; write '{stop}-{start}'")
    return range(start, stop + 1)


Indices = Annotated[
    tuple[int, ...],
    BeforeValidator(parse_indices),
    PlainSerializer(list, return_type=list),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": r"^\s*\d+(\s*-\s*\d+)?(\s*,\s*\d+(\s*-\s*\d+)?)*\s*$"},
                {"type": "integer", "minimum": 0},
                {"type": "array", "items": {"type": ["integer", "string"]}},
            ],
            "description": "Indices: '0-23', '0,5,10', '0-10,50-60', an int or a list.",
        }
    ),
]
"""A tuple of non-negative ints, written as in the seed scripts' flags."""
