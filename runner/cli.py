"""The ``runner`` command: validate, plan, run, rerun, diff, report, cache, schema, list, show.

User errors (bad specs, unknown names, unavailable resources) print a message without a traceback
and exit 2, like pytest's usage errors. Run exit codes follow pytest: 0 all passed, 1 failures,
2 interrupted or usage error, 5 no case selected.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["main"]

# Nothing but the standard library is imported above this line: `runner --help` answers before
# pydantic, rich or any analysis is imported. Each command imports what it uses.

NO_CASES_EXIT_CODE = 5


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="runner",
        description="Declarative experiment runner for mechanistic interpretability: "
        "validate, plan, run, rerun, diff and report YAML experiment specs.",
    )
    parser.add_argument("--fulltrace", action="store_true", help="show tracebacks for user errors too")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    validate = sub.add_parser("validate", help="check spec files (default: specs/)")
    validate.add_argument("paths", nargs="*", type=Path, help="spec files or directories (recursive)")

    for name, help_text in (("run", "run a spec"), ("plan", "show a spec's plan without running it")):
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("spec", type=Path)
        cmd.add_argument(
            "-k", dest="keyword", metavar="EXPR", help="select cases like pytest -k (and/or/not)"
        )
        if name == "run":
            cmd.add_argument(
                "--collect-only", action="store_true", help="show the plan, load nothing, run nothing"
            )
            cmd.add_argument("-x", "--exitfirst", action="store_true", help="stop at the first failed case")
            cmd.add_argument("-q", "--quiet", action="count", default=0, help="less output")
            cmd.add_argument("-v", "--verbose", action="count", default=0, help="more output")
            cmd.add_argument(
                "--output-dir", type=Path, help="parent of run folders (default: the spec's output.dir)"
            )
            cmd.add_argument(
                "--device", choices=["auto", "cpu", "cuda"], help="override the spec's model.device"
            )
            cmd.add_argument(
                "--force", action="store_true", help="recompute the selected cases (and store them)"
            )
            cmd.add_argument(
                "--lf",
                "--last-failed",
                dest="last_failed",
                action="store_true",
                help="run only the cases that failed or errored in the spec's last run",
            )
            cmd.add_argument(
                "--no-cache", action="store_true", help="neither read nor write the result cache"
            )
            cmd.add_argument(
                "--executor",
                choices=["local", "ray"],
                default="local",
                help="run cases in this process (local, the default) or on Ray workers",
            )
            cmd.add_argument(
                "--address",
                metavar="ADDR",
                help="with --executor ray: the cluster to join (auto, ray://host:10001); "
                "default a local Ray instance",
            )
        cmd.add_argument(
            "--cache-dir",
            type=Path,
            help="the result cache (default $RUNNER_RESULTS_CACHE, $RUNNER_CACHE_DIR/results "
            "or ~/.cache/runner/results)",
        )

    rerun = sub.add_parser("rerun", help="run a run folder's spec again without the cache and compare")
    rerun.add_argument("run_dir", type=Path)
    rerun.add_argument(
        "--output-dir", type=Path, help="parent of the new run folder (default: beside RUN_DIR)"
    )
    rerun.add_argument("--rtol", type=float, help="relative tolerance for every analysis")
    rerun.add_argument("--atol", type=float, help="absolute tolerance for every analysis")
    rerun.add_argument("-k", dest="keyword", metavar="EXPR", help="rerun only these cases")
    rerun.add_argument("-q", "--quiet", action="count", default=0, help="less output")
    rerun.add_argument("-v", "--verbose", action="count", default=0, help="more output")
    diff = sub.add_parser("diff", help="what differs between two run folders")
    diff.add_argument("run_a", type=Path)
    diff.add_argument("run_b", type=Path)
    diff.add_argument("--html", type=Path, help="write the comparison as HTML here (default: diff.html)")
    diff.add_argument("--rtol", type=float, default=0.0, help="differences within it are not listed")
    diff.add_argument("--atol", type=float, default=0.0, help="differences within it are not listed")
    report = sub.add_parser("report", help="re-render report.md and report.html from a run folder")
    report.add_argument("run_dir", type=Path)
    cache = sub.add_parser("cache", help="see or trim the result cache")
    cache.add_argument("action", choices=["ls", "prune"])
    cache.add_argument("--older-than", metavar="AGE", help="prune entries unused for AGE (30d, 12h, 45m)")
    cache.add_argument("--cache-dir", type=Path, help="the result cache folder")

    sub.add_parser("schema", help="print the JSON Schema of spec files")
    sub.add_parser("list", help="list registered analyses")
    show = sub.add_parser("show", help="show an analysis' parameters")
    show.add_argument("name")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``runner`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    from rich.console import Console
    from rich.markup import escape

    from runner.errors import RunnerError
    from runner.registry import load_analyses

    # soft_wrap: never break a `file:line:col: field: message` line, so it stays clickable and greppable
    out, err = Console(highlight=False, soft_wrap=True), Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        load_analyses()
        return COMMANDS[args.command](args, out)
    except RunnerError as exc:
        if args.fulltrace:
            err.print_exception()
        err.print(f"[red]ERROR:[/red] {escape(str(exc))}")
        return exc.exit_code
    except KeyboardInterrupt:
        err.print("[yellow]Interrupted.[/yellow]")
        return 2


def _validate(args: argparse.Namespace, out: Console) -> int:
    from rich.markup import escape

    from runner.errors import RunnerError, SpecError
    from runner.loader import find_spec_files
    from runner.planner import cases_text

    paths = find_spec_files(args.paths or [Path("specs")])
    if not paths:
        raise RunnerError(
            f"No spec files (*.yaml, *.yml) found in {', '.join(map(str, args.paths or ['specs']))}."
        )
    failed = 0
    for path in paths:
        try:
            plan = _load_plan(path)
        except SpecError as exc:
            failed += 1
            out.print(f"[red]FAILED[/red] {escape(str(path))}")
            out.print(escape(str(exc)), soft_wrap=True)
            continue
        out.print(f"[green]ok[/green]     {escape(str(path))} ({cases_text(len(plan.cases))})")
    out.print(f"{len(paths) - failed} valid, {failed} invalid")
    return 2 if failed else 0


def _load_plan(path: Path, keyword: str | None = None) -> Any:
    from runner.planner import load_plan

    return load_plan(path, keyword)


def _plan(args: argparse.Namespace, out: Console) -> int:
    plan = _load_plan(args.spec, args.keyword)
    states = None if getattr(args, "collect_only", False) else _cache_states(plan, args)
    print_plan(plan, out, states)
    return 0 if plan.cases else NO_CASES_EXIT_CODE


def _cache_states(plan: Any, args: argparse.Namespace) -> dict[str, str]:
    from runner.cache import FileHashes, ResultCache, default_results_dir
    from runner.plan_state import cache_states

    root = args.cache_dir or default_results_dir()
    hashes = FileHashes(root / "file-hashes.json")
    states = cache_states(plan, ResultCache(root), hashes, Path(plan.source).parent)
    hashes.save()
    return states


def print_plan(plan: Any, out: Console, states: dict[str, str] | None = None) -> None:
    """The plan as a tree, like ``pytest --collect-only``."""
    from rich.markup import escape
    from rich.tree import Tree

    from runner.models.naming import describe_model
    from runner.planner import cases_text

    spec = plan.spec
    source = describe_model(spec.model.name)
    tree = Tree(f"[bold]<Spec {escape(spec.name)}>[/bold] {escape(plan.source)}")
    tree.add(
        f"model: {escape(spec.model.name)} ({source['kind']}: {escape(source['location'])}), "
        f"device {spec.model.device}, {spec.model.dtype}"
    )
    tree.add(
        f"dataset: {escape(spec.dataset.name)}, {spec.dataset.max_passages} passages × "
        f"{spec.dataset.max_len} tokens"
    )
    steps: dict[str, Any] = {}
    for case in plan.cases:
        if case.step.id not in steps:
            steps[case.step.id] = tree.add(f"<Step {escape(case.step.id)}: {escape(case.analysis)}>")
        state = f" {_styled_state(states[case.id])}" if states else ""
        node = steps[case.step.id].add(f"<Case {escape(case.id)}>{state}")
        for check in case.checks:
            node.add(f"[dim]expect: {escape(check.expression.text)}[/dim]")
    out.print(tree, crop=False)
    deselected = f", {len(plan.deselected)} deselected" if plan.deselected else ""
    counts = ""
    if states:
        kinds = [state.split(":")[0].split(" ")[0] for state in states.values()]
        counts = (
            " (" + ", ".join(f"{kinds.count(k)} {k}" for k in ("cached", "new", "stale") if k in kinds) + ")"
        )
    out.print(f"{cases_text(len(plan.cases))} collected{deselected}{counts}")


def _styled_state(state: str) -> str:
    from rich.markup import escape

    color = {"cached": "green", "new": "cyan", "stale": "yellow"}.get(
        state.split(":")[0].split(" ")[0], "red"
    )
    return f"[{color}]{escape(state)}[/{color}]"


def _run(args: argparse.Namespace, out: Console) -> int:
    plan = _load_plan(args.spec, args.keyword)
    if args.collect_only:
        return _plan(args, out)
    if args.last_failed:
        plan = _last_failed(plan, args, out)
    if args.address and args.executor != "ray":
        from runner.errors import RunnerError

        raise RunnerError("--address names a Ray cluster: use it with --executor ray.")
    if args.executor == "ray":
        from runner.ray_executor import import_ray

        import_ray()  # not installed: say so before a run folder is made
    if not plan.cases:
        out.print(f"no cases selected ({len(plan.deselected)} deselected by -k {args.keyword!r})")
        return NO_CASES_EXIT_CODE
    from runner.session import run_session

    return run_session(plan, args, out)


def _last_failed(plan: Any, args: argparse.Namespace, out: Console) -> Any:
    """``--lf``: the cases that failed or errored in the spec's newest run folder (all when none did)."""
    from runner.load import newest_run_dir, read_manifest
    from runner.planner import Plan

    last = newest_run_dir(args.output_dir or Path(plan.spec.output.dir), plan.spec.name)
    if last is None:
        out.print("run-last-failure: no earlier run of this spec; running every selected case")
        return plan
    records = read_manifest(last).get("cases", {})
    failed = {case_id for case_id, r in records.items() if r.get("status") in ("failed", "error")}
    kept = tuple(c for c in plan.cases if c.id in failed)
    if not kept:
        out.print(f"run-last-failure: no failed case in {last}; running every selected case")
        return plan
    dropped = tuple(c for c in plan.cases if c.id not in failed)
    out.print(f"run-last-failure: rerunning {len(kept)} case(s) that failed in {last}")
    return Plan(plan.spec, plan.source, kept, plan.deselected + dropped)


def _report(args: argparse.Namespace, out: Console) -> int:
    from rich.markup import escape

    from runner.load import rerender_reports

    for path in rerender_reports(args.run_dir):
        out.print(f"report: {escape(str(path))}")
    return 0


def _rerun(args: argparse.Namespace, out: Console) -> int:
    from runner.compare import rerun

    return rerun(args, out)


def _diff(args: argparse.Namespace, out: Console) -> int:
    from runner.compare import diff_runs

    return diff_runs(args, out)


def _cache(args: argparse.Namespace, out: Console) -> int:
    from rich.markup import escape
    from rich.table import Table

    from runner.cache import ResultCache, default_results_dir, parse_age

    cache = ResultCache(args.cache_dir or default_results_dir())
    if args.action == "prune":
        age = parse_age(args.older_than) if args.older_than else None
        removed, freed = cache.prune(age)
        out.print(f"removed {removed} entries ({freed / 1e6:.1f} MB) from {escape(str(cache.root))}")
        return 0
    entries = cache.entries()
    table = Table("key", "spec", "case", "created", "last used", "MB", "run", box=None)
    for e in entries:
        m = e.meta
        table.add_row(
            *(
                escape(str(cell))
                for cell in (
                    e.key[:12],
                    m.get("spec", ""),
                    m.get("case", ""),
                    str(m.get("created", ""))[:16].replace("T", " "),
                    str(m.get("used") or "")[:16].replace("T", " "),
                    f"{cache.size(e) / 1e6:.2f}",
                    m.get("run_dir") or "",
                )
            )
        )
    out.print(table)
    total = sum(cache.size(e) for e in entries)
    out.print(f"{len(entries)} entries, {total / 1e6:.1f} MB in {escape(str(cache.root))}")
    return 0


def _schema(args: argparse.Namespace, out: Console) -> int:
    import json

    from runner.schema import spec_json_schema

    print(json.dumps(spec_json_schema(), indent=2))
    return 0


def _list(args: argparse.Namespace, out: Console) -> int:
    from rich.table import Table

    from runner.registry import ANALYSES

    table = Table("analysis", "what it does", box=None)
    for name in ANALYSES.names():
        table.add_row(name, ANALYSES.get(name).summary)
    out.print(table)
    return 0


def _show(args: argparse.Namespace, out: Console) -> int:
    from rich.markup import escape

    from runner.registry import ANALYSES

    item = ANALYSES.get(args.name)
    out.print(f"[bold]{item.name}[/bold] — {escape(item.summary)}\n")
    out.print("[bold underline]params[/bold underline] (a step's `params:`)")
    for field_name, info in item.params_model.model_fields.items():
        default = "required" if info.is_required() else f"= {info.get_default(call_default_factory=True)!r}"
        _show_field(out, field_name, f"{_field_type(info)} {default}", info.description)
    result = item.result_model.__name__
    out.print(f"\n[bold underline]result[/bold underline] ({result}: what expectations and later steps read)")
    for field_name, info in item.result_model.model_fields.items():
        _show_field(out, field_name, _field_type(info), info.description)
    return 0


def _field_type(info: Any) -> str:
    """A field's readable type; pydantic keeps a top-level ``Annotated``'s metadata apart from its type."""
    annotation = info.annotation
    if info.metadata:
        annotation = typing.Annotated[(annotation, *info.metadata)]
    return type_name(annotation)


def _show_field(out: Console, name: str, kind: str, description: str | None) -> None:
    from rich.markup import escape

    out.print(f"[bold]{name}[/bold]: {escape(kind)}")
    if description:
        out.print(f"    {escape(' '.join(description.replace('``', '`').split()))}")


def type_name(annotation: Any) -> str:
    """A readable type: ``Literal["a", "b"]`` → ``'a' | 'b'``; ``Indices`` → ``indices (...)``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin is typing.Annotated:
        from runner.results import Array, JSONValue

        for known, name in ((Array, "array"), (JSONValue, "json")):
            if args[1:] == typing.get_args(known)[1:]:
                return name
        return "indices ('0-23', '0,5,10')" if args[0] == tuple[int, ...] else type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if args:
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    return "None" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


COMMANDS = {
    "validate": _validate,
    "plan": _plan,
    "run": _run,
    "rerun": _rerun,
    "diff": _diff,
    "report": _report,
    "cache": _cache,
    "schema": _schema,
    "list": _list,
    "show": _show,
}


if __name__ == "__main__":
    sys.exit(main())
