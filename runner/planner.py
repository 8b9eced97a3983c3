"""Planning: a validated spec → a frozen :class:`Plan` of cases, like pytest's collection.

Sweeps expand into cases with pytest-like ids (``importance[aggregate_by=gradients-layers=0-5]``).
Every case's params are validated against its analysis' params model here, so that `runner validate`
and ``--collect-only`` catch every spec problem without loading a model.

A spec-level sweep multiplies a step only by the resources it uses. A step whose analysis needs no
model and no dataset (one that reads earlier steps' results, like a cross-model comparison) is not
multiplied by swept ``model.*`` or ``dataset.*`` values, only by a swept ``seed``; it runs after every
swept variant of the steps listed before it, and before any of the steps listed after it.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from runner.errors import ExpressionError, SpecError, SpecProblem
from runner.expressions import Expression, parse_expression
from runner.keywords import compile_keyword_expression
from runner.loader import Loc, SpecDocument, load_spec, problems_from, read_document, sort_problems
from runner.registry import ANALYSES, did_you_mean
from runner.spec import DatasetSpec, ExperimentSpec, ModelSpec, StepSpec, SweepSpec

__all__ = ["Case", "Plan", "build_plan", "cases_text", "load_plan", "select_cases"]


@dataclass(frozen=True)
class Check:
    """One expectation bound to a case."""

    name: str
    expression: Expression


@dataclass(frozen=True)
class Case:
    """One run of one analysis with fully resolved params and resources."""

    id: str
    step: StepSpec
    params: BaseModel
    model: ModelSpec
    dataset: DatasetSpec
    seed: int
    sweep_values: dict[str, Any]
    checks: tuple[Check, ...] = ()

    @property
    def analysis(self) -> str:
        """The registered analysis name."""
        return self.step.analysis

    def keywords(self) -> list[str]:
        """Strings that ``-k`` matches against (substring, case-insensitive)."""
        return [self.id, self.step.id, self.analysis]

    def describe(self) -> dict[str, Any]:
        """JSON-able description for the manifest and ``--collect-only``."""
        return {
            "id": self.id,
            "step": self.step.id,
            "analysis": self.analysis,
            "params": self.params.model_dump(mode="json"),
            "sweep_values": self.sweep_values,
            "model": self.model.model_dump(mode="json"),
            "dataset": self.dataset.model_dump(mode="json"),
            "seed": self.seed,
            "expectations": [{"name": c.name, "that": c.expression.text} for c in self.checks],
        }


@dataclass(frozen=True)
class Plan:
    """The cases of a spec in execution order, plus those ``-k`` deselected."""

    spec: ExperimentSpec
    source: str
    cases: tuple[Case, ...]
    deselected: tuple[Case, ...] = field(default=())

    def describe(self) -> list[dict[str, Any]]:
        """JSON-able list of selected cases."""
        return [case.describe() for case in self.cases]


def cases_text(n: int) -> str:
    """``1 case``, ``2 cases``: a count of cases as the console writes it."""
    return f"{n} case" if n == 1 else f"{n} cases"


def build_plan(spec: ExperimentSpec, doc: SpecDocument) -> Plan:
    """Expand ``spec`` into cases, validating params, sweeps and expectations; raise :class:`SpecError`."""
    problems: list[SpecProblem] = []
    checks = _checks(spec, doc, problems)
    _check_steps(spec, doc, problems)
    _check_size(spec, doc, problems)
    cases: list[Case] = []
    if not problems:
        variants = list(_spec_variants(spec, doc, problems))
        for steps, phase_variants in _phases(spec, variants):
            for resources in phase_variants:
                for index, step in steps:
                    cases.extend(_step_cases(step, index, resources, checks.get(step.id, ()), doc, problems))
    if problems:
        raise SpecError(sort_problems(_unique(problems)))
    return Plan(spec, doc.path, tuple(_dedupe_ids(cases)))


def load_plan(path: Path, keyword: str | None = None) -> Plan:
    """Read, validate and plan a spec file, reporting every problem in it at once."""
    doc = read_document(path)
    try:
        spec, _ = load_spec(path, document=doc)
    except SpecError as exc:
        # The spec's own fields are invalid; still check each step's params so that the user
        # sees every problem of the file in one pass.
        raise SpecError(sort_problems(_unique([*exc.problems, *_raw_params_problems(doc)]))) from None
    return select_cases(build_plan(spec, doc), keyword)


def _raw_params_problems(doc: SpecDocument) -> list[SpecProblem]:
    steps = doc.data.get("steps") if isinstance(doc.data, dict) else None
    problems: list[SpecProblem] = []
    for index, step in enumerate(steps if isinstance(steps, list) else []):
        name = step.get("analysis") if isinstance(step, dict) else None
        if isinstance(name, str) and name not in ANALYSES:
            problems.append(doc.problem(("steps", index, "analysis"), ANALYSES.unknown_message(name)))
        if not isinstance(name, str) or name not in ANALYSES:
            continue
        params = step.get("params", {})
        if isinstance(params, dict):
            _validate_params(ANALYSES.get(step["analysis"]).params_model, params, {}, index, doc, problems)
    return problems


def select_cases(plan: Plan, keyword: str | None) -> Plan:
    """Keep the cases matching a pytest ``-k`` expression."""
    if not keyword:
        return plan
    matches = compile_keyword_expression(keyword)
    kept = tuple(c for c in plan.cases if matches(c.keywords()))
    dropped = tuple(c for c in plan.cases if not matches(c.keywords()))
    return Plan(plan.spec, plan.source, kept, plan.deselected + dropped)


def _check_steps(spec: ExperimentSpec, doc: SpecDocument, problems: list[SpecProblem]) -> None:
    seen: dict[str, int] = {}
    for index, step in enumerate(spec.steps):
        if step.id in seen:
            problems.append(
                doc.problem(
                    ("steps", index, "id"),
                    f"step id {step.id!r} is already used by steps[{seen[step.id]}]; step ids must be unique",
                )
            )
        seen.setdefault(step.id, index)
        if step.analysis not in ANALYSES:
            problems.append(
                doc.problem(
                    ("steps", index, "analysis"),
                    ANALYSES.unknown_message(step.analysis) + "\nRun `runner list` to see every analysis.",
                )
            )


MAX_CASES = 10_000
"""Most cases a spec may expand into. Sweeps multiply: seven keys of ten values are ten million
cases, which would take minutes and gigabytes to plan; no experiment runs that many cases."""


def sweep_size(sweep: SweepSpec | None) -> int:
    """Number of combinations of ``sweep`` (1 without one), computed without expanding it."""
    if sweep is None:
        return 1
    size = math.prod(len(values) for values in sweep.product.values())
    return size * (len(next(iter(sweep.zip.values()))) if sweep.zip else 1)


def _check_size(spec: ExperimentSpec, doc: SpecDocument, problems: list[SpecProblem]) -> None:
    """Refuse a spec whose sweeps expand past :data:`MAX_CASES` before expanding anything."""
    per_variant = sum(sweep_size(step.sweep) for step in spec.steps)
    total = sweep_size(spec.sweep) * per_variant
    if total <= MAX_CASES:
        return
    biggest = max(range(len(spec.steps)), key=lambda i: sweep_size(spec.steps[i].sweep))
    loc: Loc = ("steps", biggest, "sweep")
    if sweep_size(spec.sweep) > sweep_size(spec.steps[biggest].sweep):
        loc = ("sweep",)
    problems.append(
        doc.problem(
            loc,
            f"the sweeps expand into {total:,} cases, more than the {MAX_CASES:,} a spec may hold "
            "(the lists under `product:` multiply). Sweep fewer values, or split the experiment into "
            "several specs.",
            key=True,
        )
    )


def _checks(
    spec: ExperimentSpec, doc: SpecDocument, problems: list[SpecProblem]
) -> dict[str, tuple[Check, ...]]:
    ids = [s.id for s in spec.steps]
    out: dict[str, list[Check]] = {}
    for index, exp in enumerate(spec.expectations):
        if exp.step not in ids:
            problems.append(
                doc.problem(
                    ("expectations", index, "step"),
                    f"no step {exp.step!r}.{did_you_mean(exp.step, ids)} Steps: {', '.join(ids)}",
                )
            )
            continue
        try:
            expression = parse_expression(exp.that)
        except ExpressionError as exc:
            problems.append(doc.problem(("expectations", index, "that"), str(exc)))
            continue
        out.setdefault(exp.step, []).append(Check(exp.name or exp.that, expression))
    return {k: tuple(v) for k, v in out.items()}


@dataclass(frozen=True)
class _Resources:
    model: ModelSpec
    dataset: DatasetSpec
    seed: int
    values: dict[str, Any]


def _spec_variants(
    spec: ExperimentSpec, doc: SpecDocument, problems: list[SpecProblem]
) -> Iterator[_Resources]:
    base = _Resources(spec.model, spec.dataset, spec.seed, {})
    if spec.sweep is None:
        yield base
        return
    for combo, locs in _combinations(spec.sweep, ("sweep",)):
        unknown = [k for k in combo if not _is_resource_key(k)]
        for key in unknown:
            problems.append(
                doc.problem(
                    locs[key],
                    "a spec-level sweep key must be `seed`, `model.<field>` or "
                    f"`dataset.<field>`.{did_you_mean(key, _resource_keys())}",
                    key=True,
                )
            )
        if unknown:
            return
        resources = _with_resources(base, combo, locs, doc, problems)
        if resources is not None:
            yield resources


def _phases(
    spec: ExperimentSpec, variants: list[_Resources]
) -> Iterator[tuple[list[tuple[int, StepSpec]], list[_Resources]]]:
    """Runs of consecutive steps, each with the spec variants it is multiplied by (in execution order).

    Steps that use the model or the dataset take every variant; the others take the variants with
    swept ``model.*`` and ``dataset.*`` values removed (so one per swept seed). Each variant's steps
    run together, so a model sweep loads each model once per run of model steps.
    """
    base = _Resources(spec.model, spec.dataset, spec.seed, {})
    indexed = list(enumerate(spec.steps))
    for uses_resources, group in itertools.groupby(indexed, key=lambda item: _uses_resources(item[1])):
        yield list(group), variants if uses_resources else _without_resource_values(variants, base)


def _uses_resources(step: StepSpec) -> bool:
    return bool(ANALYSES.get(step.analysis).needs & {"model", "dataset"})


def _without_resource_values(variants: list[_Resources], base: _Resources) -> list[_Resources]:
    """``variants`` with swept ``model.*`` / ``dataset.*`` values dropped, duplicates removed."""
    kept: dict[tuple[Any, ...], _Resources] = {}
    for variant in variants:
        values = {k: v for k, v in variant.values.items() if not k.startswith(("model.", "dataset."))}
        key = tuple((k, repr(v)) for k, v in values.items())
        kept.setdefault(key, _Resources(base.model, base.dataset, variant.seed, values))
    return list(kept.values())


def _is_resource_key(key: str) -> bool:
    return key in _resource_keys()


def _resource_keys() -> list[str]:
    return [
        "seed",
        *(f"model.{f}" for f in ModelSpec.model_fields),
        *(f"dataset.{f}" for f in DatasetSpec.model_fields),
    ]


def _with_resources(
    base: _Resources,
    combo: dict[str, Any],
    locs: dict[str, Loc],
    doc: SpecDocument,
    problems: list[SpecProblem],
) -> _Resources | None:
    """``base`` with the swept ``seed`` / ``model.*`` / ``dataset.*`` values of ``combo`` applied."""
    sections: dict[str, dict[str, Any]] = {
        "model": base.model.model_dump(),
        "dataset": base.dataset.model_dump(),
    }
    seed: Any = base.seed
    for key, value in combo.items():
        if key == "seed":
            seed = value
        else:
            root, _, leaf = key.partition(".")
            sections[root][leaf] = value
    try:
        return _Resources(
            ModelSpec(**sections["model"]),
            DatasetSpec(**sections["dataset"]),
            int(seed),
            {**base.values, **combo},
        )
    except (ValidationError, ValueError, TypeError) as exc:
        where = locs[next(iter(combo))]
        problems.append(doc.problem(where, f"a swept value is invalid: {exc}"))
        return None


def _step_cases(
    step: StepSpec,
    index: int,
    resources: _Resources,
    checks: tuple[Check, ...],
    doc: SpecDocument,
    problems: list[SpecProblem],
) -> Iterator[Case]:
    params_model = ANALYSES.get(step.analysis).params_model
    combos = _combinations(step.sweep, ("steps", index, "sweep")) if step.sweep else iter([({}, {})])
    for combo, locs in combos:
        swept_params = {k: v for k, v in combo.items() if not _is_resource_key(k)}
        unknown = [k for k in swept_params if k not in params_model.model_fields]
        for key in unknown:
            fields = list(params_model.model_fields)
            problems.append(
                doc.problem(
                    locs[key],
                    f"{step.analysis} has no parameter {key!r}."
                    f"{did_you_mean(key, [*fields, *_resource_keys()])} Parameters: "
                    f"{', '.join(fields)} (or a resource: seed, model.<field>, "
                    "dataset.<field>)",
                    key=True,
                )
            )
        if unknown:
            return
        swept_resources = {k: v for k, v in combo.items() if _is_resource_key(k)}
        case_resources = (
            _with_resources(resources, swept_resources, locs, doc, problems) if swept_resources else resources
        )
        params = _validate_params(params_model, {**step.params, **swept_params}, locs, index, doc, problems)
        if params is not None and case_resources is not None:
            values = {**resources.values, **combo}
            yield Case(
                _case_id(step.id, values),
                step,
                params,
                case_resources.model,
                case_resources.dataset,
                case_resources.seed,
                values,
                checks,
            )


def _validate_params(
    model: type[BaseModel],
    values: dict[str, Any],
    sweep_locs: dict[str, Loc],
    index: int,
    doc: SpecDocument,
    problems: list[SpecProblem],
) -> BaseModel | None:
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        for problem in problems_from(exc, doc, model, ("steps", index, "params")):
            problems.append(_relocate_to_sweep(problem, exc, sweep_locs, doc))
        return None


def _relocate_to_sweep(
    problem: SpecProblem, exc: ValidationError, sweep_locs: dict[str, Loc], doc: SpecDocument
) -> SpecProblem:
    key = problem.field.split(".params.", 1)[-1].split(".")[0].split("[")[0]
    if key in sweep_locs:
        return SpecProblem(
            doc.locate(sweep_locs[key]), problem.field, problem.message + " (value from the sweep)"
        )
    return problem


def _combinations(sweep: SweepSpec, base: Loc) -> Iterator[tuple[dict[str, Any], dict[str, Loc]]]:
    """Every (values, value locations) of a sweep: product axes, then the zip group as one axis."""
    axes: list[list[tuple[dict[str, Any], dict[str, Loc]]]] = [
        [({k: v}, {k: (*base, "product", k, i)}) for i, v in enumerate(vs)] for k, vs in sweep.product.items()
    ]
    if sweep.zip:
        n = len(next(iter(sweep.zip.values())))
        axes.append(
            [
                ({k: vs[i] for k, vs in sweep.zip.items()}, {k: (*base, "zip", k, i) for k in sweep.zip})
                for i in range(n)
            ]
        )
    for picks in itertools.product(*axes):
        values: dict[str, Any] = {}
        locs: dict[str, Loc] = {}
        for v, loc in picks:
            values.update(v)
            locs.update(loc)
        yield values, locs


def _case_id(step_id: str, values: dict[str, Any]) -> str:
    if not values:
        return step_id
    return f"{step_id}[{'-'.join(f'{k}={_id_part(v)}' for k, v in values.items())}]"


def _id_part(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ",".join(_id_part(v) for v in value)
    if isinstance(value, dict):
        return ",".join(f"{k}:{_id_part(v)}" for k, v in value.items())
    return str(value).replace(" ", "_")


def _dedupe_ids(cases: list[Case]) -> list[Case]:
    """Make repeated ids unique as pytest does: a counter, after ``_`` when the id ends in a digit."""
    counts: dict[str, int] = {}
    for case in cases:
        counts[case.id] = counts.get(case.id, 0) + 1
    taken = set(counts)
    next_suffix: dict[str, int] = {}
    out = []
    for case in cases:
        if counts[case.id] > 1:
            inner, bracket = (case.id[:-1], "]") if case.id.endswith("]") else (case.id, "")
            sep = "_" if inner[-1:].isdigit() else ""
            n = next_suffix.get(case.id, 0)
            while f"{inner}{sep}{n}{bracket}" in taken:
                n += 1
            next_suffix[case.id] = n + 1
            new_id = f"{inner}{sep}{n}{bracket}"
            taken.add(new_id)
            case = dataclasses.replace(case, id=new_id)
        out.append(case)
    return out


def _unique(problems: list[SpecProblem]) -> list[SpecProblem]:
    return list(dict.fromkeys(problems))
