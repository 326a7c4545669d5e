"""Check recorded histories (JSON lines, one file per process) against G1, G2 and G3.

Exit status: 0 when no regression, torn graph or stale root was found; 1 when one was; 2 when a file is
missing, unreadable or malformed (the message names the file and line).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .._cli import UsageError, count_or_zero
from ._checker import check
from ._history import HistoryError, read_history
from ._report import format_report, write_json

EXIT_OK = 0
EXIT_VIOLATIONS = 1


def _output_file(text: str) -> Path:
    """A file to write: in an existing directory, and not itself a directory."""
    path = Path(text)
    if not text or path.is_dir():
        raise argparse.ArgumentTypeError(f"want a file name, got {text!r}")
    if not path.absolute().parent.is_dir():
        raise argparse.ArgumentTypeError(f"no directory {str(path.parent)!r} to write {path.name!r} in")
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("histories", nargs="+", type=Path, metavar="HISTORY", help="JSON-lines history file")
    parser.add_argument(
        "--json", type=_output_file, metavar="OUT", help="also write the report as JSON to OUT"
    )
    parser.add_argument(
        "--examples", type=count_or_zero, default=5, metavar="N",
        help="examples to show per guarantee (default 5)",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    try:
        report = check(read_history(*args.histories), max_examples=args.examples)
    except HistoryError as exc:
        raise UsageError(str(exc)) from exc
    except OSError as exc:
        raise UsageError(f"cannot read history: {exc.filename}: {exc.strerror}") from exc
    print(format_report(report, title=f"check of {len(args.histories)} history file(s)"))
    if args.json is not None:
        write_json(args.json, report)
    return EXIT_OK if report.ok else EXIT_VIOLATIONS
