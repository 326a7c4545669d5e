"""Check recorded histories (JSON lines, one file per process) against G1, G2 and G3.

Exit status: 0 when no regression, torn graph or stale root was found; 1 when one was; 2 when a file is
missing or malformed (the message names the file and line).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._checker import check
from ._history import HistoryError, read_history
from ._report import format_report, write_json

EXIT_OK = 0
EXIT_VIOLATIONS = 1
EXIT_BAD_INPUT = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("histories", nargs="+", type=Path, metavar="HISTORY", help="JSON-lines history file")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the report as JSON to OUT")
    parser.add_argument(
        "--examples", type=int, default=5, metavar="N", help="examples to show per guarantee (default 5)"
    )


def run(args: argparse.Namespace) -> int:
    if args.examples < 0:
        print(f"error: --examples must be >= 0, got {args.examples}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        report = check(read_history(*args.histories), max_examples=args.examples)
    except HistoryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:
        print(f"error: cannot read history: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(format_report(report, title=f"check of {len(args.histories)} history file(s)"))
    if args.json is not None:
        write_json(args.json, report)
    return EXIT_OK if report.ok else EXIT_VIOLATIONS
