"""What ``runner plan`` says of each case: ``cached``, ``new`` or ``stale: <what changed>``.

Computed from the cache's entries and index alone: no model is loaded, and file hashes come from
:class:`~runner.cache.FileHashes` (so a 100 MB model file is hashed once, not on every plan).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from runner.cache import FileHashes, KeyMaker, ResultCache, base_key, describe_changes
from runner.errors import RunnerError

if TYPE_CHECKING:
    from runner.planner import Plan

__all__ = ["cache_states"]


def cache_states(plan: Plan, cache: ResultCache, hashes: FileHashes, base_dir: Path) -> dict[str, str]:
    """Case id → its cache state and the reason, in plan order.

    A case is ``cached`` when an entry exists for its inputs and the earlier cases it read have
    the keys they had then; ``stale`` when its last entry had other inputs (named, old -> new) or
    an earlier step it reads will run again; ``new`` otherwise.
    """
    keys = KeyMaker(base_dir, hashes)
    step_keys: dict[str, list[str]] = {}
    states: dict[str, str] = {}
    for case in plan.cases:
        key = ""
        try:
            inputs = keys.inputs(case)
        except RunnerError as exc:
            states[case.id] = f"unknown: {str(exc).splitlines()[0]}"
            step_keys.setdefault(case.step.id, []).append(key)
            continue
        base = base_key(inputs)
        entry = cache.peek(base)
        if entry is not None:
            changed = [s for s, old in entry.reads.items() if step_keys.get(s, []) != old]
            if changed:
                states[case.id] = f"stale: earlier step {', '.join(changed)} runs again"
            else:
                states[case.id] = f"cached ({entry.describe()})"
                key = entry.key
        else:
            previous = cache.previous(plan.spec.name, case.id)
            if previous is None:
                states[case.id] = "new"
            elif previous.get("base") == base:
                states[case.id] = "new (its cache entry was removed)"
            else:
                states[case.id] = f"stale: {describe_changes(previous.get('inputs', {}), inputs)}"
        step_keys.setdefault(case.step.id, []).append(key)
    return states
