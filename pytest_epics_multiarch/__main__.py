"""``python -m pytest_epics_multiarch merge-reports A.json B.json ... -o ALL.json``.

Merges the JSON reports of several runs (e.g. one CI job per target) into one verdict. Exit
code 0 when the merged gate passes, 1 when it fails, 2 on bad input.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .reporting import ReportError, load_report, merge


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pytest_epics_multiarch")
    commands = parser.add_subparsers(dest="command", required=True)
    merge_cmd = commands.add_parser("merge-reports", help="merge --epics-report files into one verdict")
    merge_cmd.add_argument("reports", nargs="+", type=Path, metavar="REPORT.json")
    merge_cmd.add_argument("-o", "--output", type=Path, help="write the merged report here")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on bad usage, 0 for --help
        return int(exc.code or 0)
    try:
        merged = merge(load_report(path) for path in args.reports)
    except ReportError as exc:
        print(f"merge-reports: {exc}", file=sys.stderr)
        return 2
    if args.output:
        merged.write(args.output)
    problems = merged.gate_problems()
    for line in merged.table():
        print(line)
    for name in merged.targets:
        why = problems.get(name)
        print(f"{name}: {'FAIL: ' + why if why else 'pass'}")
    verdict = merged.to_json()["gate"]
    print(f"gate: {verdict}")
    return 0 if verdict == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
