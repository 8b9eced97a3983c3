"""Benchmark: how long the commands editors and pre-commit hooks call take, against eager imports.

Each command runs in a fresh process (that is what a hook pays), several times; the table shows
the median and the fastest wall time. The straightforward implementation it is compared with is
the one runner had before analyses were declared lazily: every analysis' computing module (and with
them torch, TransformerLens, SAELens, matplotlib, pandas) imported before the command runs. Both
must print the same output. Targets: ``runner validate specs/`` under 1 s, ``runner --help`` under
0.3 s.

    python benchmarks/cli_startup.py [--repeats 7] [--output out.json]
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import statistics
import subprocess
import sys
import time
from typing import Any

from _machine import ROOT, describe, machine, write_json

COMMANDS = {
    "--help": ["--help"],
    "validate specs/": ["validate", "specs/"],
    "plan quickstart": ["plan", "specs/quickstart.yaml"],
    "list": ["list"],
}
TARGETS = {"--help": 0.3, "validate specs/": 1.0}


def compute_modules() -> list[str]:
    """Every analysis' computing module (``analyses.<name>.compute``)."""
    import analyses

    return [
        f"analyses.{info.name}.compute"
        for info in pkgutil.iter_modules(analyses.__path__)
        if info.ispkg and importlib.util.find_spec(f"analyses.{info.name}.compute") is not None
    ]


def command(args: list[str], eager: bool) -> list[str]:
    """The process to time: the ``runner`` entry point; when ``eager``, loading the analyses also
    imports every computing module, as runner did before (after parsing the command line)."""
    code = f"import sys\nfrom runner.cli import main\nsys.exit(main({args!r}))"
    if eager:
        code = (
            "import importlib, runner.registry as registry\n"
            "load = registry.load_analyses\n"
            "def eager(package='analyses'):\n"
            f"    for name in {compute_modules()!r}:\n"
            "        importlib.import_module(name)\n"
            "    return load(package)\n"
            "registry.load_analyses = eager\n"
        ) + code
    return [sys.executable, "-c", code]


def time_command(argv: list[str], repeats: int) -> dict[str, Any]:
    """Median and fastest wall time of ``argv`` in fresh processes, and its (first) output."""
    seconds, output = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False)
        seconds.append(time.perf_counter() - started)
        output = output if output is not None else done.stdout
    return {"median": statistics.median(seconds), "best": min(seconds), "runs": seconds, "output": output}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeats", type=int, default=7, help="runs per command and variant (default 7)")
    parser.add_argument("--output", help="JSON path (default runs/benchmarks/cli_startup-<time>.json)")
    args = parser.parse_args(argv)
    facts = machine()
    rows = {}
    for label, cli_args in COMMANDS.items():
        lazy = time_command(command(cli_args, eager=False), args.repeats)
        eager = time_command(command(cli_args, eager=True), max(2, args.repeats // 2))
        rows[label] = {
            "lazy": {k: v for k, v in lazy.items() if k != "output"},
            "eager": {k: v for k, v in eager.items() if k != "output"},
            "same_output": lazy["output"] == eager["output"],
            "target_seconds": TARGETS.get(label),
        }
    result = {"machine": facts, "repeats": args.repeats, "commands": rows}
    print_table(result)
    print(f"\nwrote {write_json(result, 'cli_startup', args.output)}")
    misses = [k for k, r in rows.items() if r["target_seconds"] and r["lazy"]["median"] > r["target_seconds"]]
    return 1 if misses or not all(r["same_output"] for r in rows.values()) else 0


def print_table(result: dict[str, Any]) -> None:
    print(f"\nrunner CLI startup, median of {result['repeats']} fresh processes each")
    print(f"machine: {describe(result['machine'])}\n")
    columns = "".join(f"{h:>10}" for h in ("runner", "fastest", "eager")) + f"{'speedup':>9}{'target':>9}"
    print(f"  {'command':<18}{columns}  same output")
    for label, row in result["commands"].items():
        lazy, eager, target = row["lazy"], row["eager"], row["target_seconds"]
        verdict = "" if target is None else ("  ok" if lazy["median"] <= target else "  MISSED")
        print(
            f"  {label:<18}{lazy['median']:>9.2f}s{lazy['best']:>9.2f}s{eager['median']:>9.2f}s"
            f"{eager['median'] / lazy['median']:>8.1f}x{'' if target is None else f'{target:>8.1f}s'}"
            f"{verdict:<8}{'yes' if row['same_output'] else 'NO'}"
        )


if __name__ == "__main__":
    sys.exit(main())
