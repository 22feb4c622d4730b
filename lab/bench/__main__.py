"""``python -m lab.bench``: run the benchmarks, print one Markdown table, write results.json.

    python -m lab.bench                      # everything; training: 1 epoch, the rest extrapolated
    python -m lab.bench --training full      # the real default training run (~4 min on 2 cores)
    python -m lab.bench --only inference database
    python -m lab.bench --skip browser training
    python -m lab.bench --only capacity --memory-cycles 200   # a shorter memory run
    python -m lab.bench --only shadow        # the app's CPU per drawing cycle with a shadow set

Training needs the full MNIST (MNIST_DIR, else data/mnist); the app and browser rows need
Chromium (/usr/bin/chromium, or CHROMIUM). Numbers depend on what else runs on the machine: the
load average before and after is recorded with them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from lab.bench.common import ROOT, Row

SECTIONS = (
    "footprint",
    "inference",
    "database",
    "history",
    "browser",
    "capacity",
    "shadow",
    "training",
    "containers",
)
RESULTS = ROOT / "lab" / "bench" / "results.json"


# Each section's module in lab/bench and its function, imported only when the section runs.
RUNNERS = {
    "footprint": ("footprint", "run"),
    "inference": ("inference", "run"),
    "database": ("database", "run"),
    "history": ("history", "run"),
    "browser": ("browser_app", "run"),
    "shadow": ("capacity", "shadow_run"),
    "containers": ("footprint", "containers"),
}


def section_runner(
    name: str, training_mode: str, memory_cycles: int = 1_000
) -> Callable[[], list[Row]]:
    if name == "training":
        from lab.bench import training

        return lambda: training.run(training_mode)
    if name == "capacity":
        from lab.bench import capacity

        return lambda: capacity.run(memory_cycles)
    module, function = RUNNERS[name]
    return getattr(importlib.import_module(f"lab.bench.{module}"), function)


def machine() -> dict:
    model = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    memory_gb = None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    memory_gb = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    import torch

    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gb": memory_gb,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def load_average() -> str:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "n/a"


def git_commit() -> str:
    result = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    return result.stdout.strip() or "unknown"


def format_value(row: Row) -> str:
    if row.value is None:
        return "-"
    value = row.value
    digits = 0 if abs(value) >= 100 else 1 if abs(value) >= 10 else 2
    return f"{value:,.{digits}f} {row.unit}".strip()


def markdown_table(rows: list[Row]) -> str:
    lines = ["| Metric | Value | Target | Result |", "|---|---|---|---|"]
    for row in rows:
        result = {True: "pass", False: "**FAIL**", None: "-"}[row.passed]
        metric = f"{row.section}: {row.metric}"
        if row.note:
            metric += f" <br><sub>{row.note}</sub>"
        lines.append(f"| {metric} | {format_value(row)} | {row.target or '-'} | {result} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lab.bench", description=__doc__.split("\n\n")[0], epilog=__doc__
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--training",
        choices=("epoch", "full", "skip"),
        default="epoch",
        help="epoch: measure 1 epoch and extrapolate the default run (default); full: run the "
        "whole default training; skip: no training rows",
    )
    parser.add_argument(
        "--memory-cycles",
        type=int,
        default=1_000,
        metavar="N",
        help="drawing cycles of the capacity section's memory run (AppTest), whose RSS growth is "
        "reported (default: 1000)",
    )
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    parser.add_argument("--skip", nargs="+", choices=SECTIONS, default=[], help="skip these")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON")
    args = parser.parse_args(argv)

    chosen = [s for s in (args.only or SECTIONS) if s not in args.skip]
    if args.training == "skip" and "training" in chosen:
        chosen.remove("training")
    info = {
        "command": "python -m lab.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "machine": machine(),
        "load_average_before": load_average(),
    }
    print(f"machine: {info['machine']}; load average {info['load_average_before']}", flush=True)

    rows: list[Row] = []
    failed = []
    for name in chosen:
        print(f"--- {name} ...", flush=True)
        start = time.perf_counter()
        try:
            section_rows = section_runner(name, args.training, args.memory_cycles)()
        except Exception as exc:
            traceback.print_exc()
            failed.append(name)
            section_rows = [Row(name, "section failed", None, "", note=f"{exc!r}"[:300])]
        rows += section_rows
        for row in section_rows:
            print(f"    {row.metric}: {format_value(row)}", flush=True)
        print(f"    ({time.perf_counter() - start:.0f} s)", flush=True)

    info["load_average_after"] = load_average()
    info["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    info["rows"] = [row.as_dict() for row in rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(info, indent=2) + "\n")

    m = info["machine"]
    print()
    print(markdown_table(rows))
    print()
    print(
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB RAM, {m['os']}, "
        f"Python {m['python']}, torch {m['torch']}. Load average (1/5/15 min) before "
        f"{info['load_average_before']}, after {info['load_average_after']}. "
        f"`{info['command'].strip()}` at {info['git_commit']}, {info['started']}."
    )
    print(f"\nwritten: {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
