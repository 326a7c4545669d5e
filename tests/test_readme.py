"""The README's embedded example runs as written and prints what the README says it prints."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _quick_start_example() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("Embedded, in a few lines", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match is not None, "the README lost its embedded example"
    return match.group(1)


def test_the_embedded_example_runs_and_prints_its_comment() -> None:
    """The quick-start example runs in a fresh interpreter and prints the output its comment promises."""
    code = _quick_start_example()
    promised = re.search(r"# (\d+ \[.*\])$", code, re.MULTILINE)
    assert promised is not None, "the example's print line lost its expected-output comment"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=README.parent,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == promised.group(1)
