"""The documentation runs as written: README.md, CHANGELOG.md and docs/*.md.

Every fenced ```python block runs in a fresh interpreter (a subprocess in an empty temporary directory),
except a block right after an HTML comment ``<!-- not run: why -->``, which must still compile. A block
whose last line carries ``# prints: TEXT`` must print exactly TEXT. Relative links resolve, anchors
included, and the tests the pages name exist.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = (ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted(DOCS.glob("*.md")))
README_MAX_LINES = 200
MAX_NOT_RUN = 3
"""Blocks marked not standalone; keep them few (each is a claim no test checks)."""

_NOT_RUN = re.compile(r"<!--\s*not run:\s*(?P<why>.+?)\s*-->")
_PRINTS = re.compile(r"#\s*prints:\s*(?P<output>.*?)\s*$")
_FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
_LINK = re.compile(r"\[[^\]]*\]\((?P<target>[^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6}\s+(?P<title>.+?)\s*$", re.MULTILINE)
_TEST_FILE = re.compile(r"\btest_[a-z0-9_]+\.py\b")
_TEST_NAME = re.compile(r"(?<![\w/.*])test_[a-z0-9_]+(?![\w*]|\.py)")
_HISTORY = re.compile(r"\b(session|issue)\s+\d+", re.IGNORECASE)
_SERVER_VARIABLES = ("REDIS_URL", "POSTGRES_DSN", "NODE_ID")
"""Examples read these to find real servers; `make test` may set the first two for the suite itself."""


@dataclass(frozen=True)
class Example:
    page: Path
    line: int
    code: str
    not_run: str | None

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def _examples(page: Path) -> list[Example]:
    """The page's ```python blocks, each with the reason it is not run (None: it runs)."""
    lines = page.read_text(encoding="utf-8").splitlines()
    found: list[Example] = []
    previous = ""  # the last non-blank line before the current one
    index = 0
    while index < len(lines):
        if lines[index].strip() == "```python":
            start = index + 1
            end = lines.index("```", start)  # ValueError: an unclosed block
            marker = _NOT_RUN.fullmatch(previous.strip())
            code = "\n".join(lines[start:end]) + "\n"
            found.append(Example(page, start, code, marker["why"] if marker else None))
            previous, index = "```", end + 1
            continue
        if lines[index].strip():
            previous = lines[index]
        index += 1
    return found


EXAMPLES = [example for page in PAGES for example in _examples(page)]
RUN = [pytest.param(e, id=e.name) for e in EXAMPLES if e.not_run is None]
NOT_RUN = [pytest.param(e, id=e.name) for e in EXAMPLES if e.not_run is not None]


def _promised_output(code: str) -> str | None:
    last = code.rstrip().splitlines()[-1]
    match = _PRINTS.search(last)
    return None if match is None else match["output"]


@pytest.mark.parametrize("example", RUN)
def test_each_example_runs_and_prints_what_it_promises(example: Example, tmp_path: Path) -> None:
    """A runnable block exits 0 in a fresh interpreter and prints what its last line promises."""
    environment = {
        name: value
        for name, value in os.environ.items()
        if name not in _SERVER_VARIABLES and not name.startswith("GRAPHCACHE_")
    }  # an example is standalone: it never reaches the suite's servers
    result = subprocess.run(
        [sys.executable, "-c", example.code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=environment,
        check=False,
    )
    assert result.returncode == 0, f"{example.name} failed:\n{result.stderr}"
    promised = _promised_output(example.code)
    if promised is not None:
        assert result.stdout.strip() == promised, f"{example.name} printed {result.stdout!r}"


@pytest.mark.parametrize("example", NOT_RUN)
def test_an_example_not_run_still_compiles(example: Example) -> None:
    """A block marked not standalone is still valid Python (top-level await allowed)."""
    compile(example.code, example.name, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


def test_few_examples_are_marked_not_run() -> None:
    """Only a few blocks are exempt from running, each with its reason."""
    exempt = [f"{e.name}: {e.not_run}" for e in EXAMPLES if e.not_run is not None]
    assert len(exempt) <= MAX_NOT_RUN, exempt


def test_the_readme_has_a_runnable_example_and_stays_short() -> None:
    """The README keeps one runnable, checked example and at most 200 lines."""
    readme = ROOT / "README.md"
    assert any(e.page == readme and e.not_run is None and _promised_output(e.code) for e in EXAMPLES)
    assert len(readme.read_text(encoding="utf-8").splitlines()) <= README_MAX_LINES


def test_the_readme_links_every_docs_page() -> None:
    """Every page under docs/ is reachable from the README."""
    targets = {m["target"].split("#")[0] for m in _LINK.finditer(_prose(ROOT / "README.md"))}
    missing = [p.name for p in DOCS.glob("*.md") if f"docs/{p.name}" not in targets]
    assert not missing


def _prose(page: Path) -> str:
    """The page without its fenced blocks."""
    return _FENCE.sub("", page.read_text(encoding="utf-8"))


def _slug(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    anchors: set[str] = set()
    for match in _HEADING.finditer(_prose(page)):
        slug = _slug(match["title"])
        candidate, repeat = slug, 0
        while candidate in anchors:
            repeat += 1
            candidate = f"{slug}-{repeat}"
        anchors.add(candidate)
    return anchors


def _resolves(page: Path, target: str) -> bool:
    if re.match(r"[a-z]+:", target):
        return True  # http:, https:, mailto: are not checked
    path, _, anchor = target.partition("#")
    resolved = (page.parent / path).resolve() if path else page
    if not resolved.is_file():
        return False
    return not anchor or resolved.suffix != ".md" or anchor in _anchors(resolved)


@pytest.mark.parametrize("page", [pytest.param(p, id=str(p.relative_to(ROOT))) for p in PAGES])
def test_every_relative_link_resolves(page: Path) -> None:
    """A relative link names an existing file, and an anchor a heading of that file."""
    broken = [m["target"] for m in _LINK.finditer(_prose(page)) if not _resolves(page, m["target"])]
    assert not broken


def test_every_test_the_docs_name_exists() -> None:
    """Test files and test functions named in the documentation exist in tests/."""
    tests = ROOT / "tests"
    defined = {m[1] for f in tests.glob("test_*.py") for m in re.finditer(r"def (test_\w+)", f.read_text())}
    text = "\n".join(page.read_text(encoding="utf-8") for page in PAGES)
    missing_files = sorted({m for m in _TEST_FILE.findall(text) if not (tests / m).is_file()})
    missing_tests = sorted({m for m in _TEST_NAME.findall(text) if m not in defined})
    assert (missing_files, missing_tests) == ([], [])


def test_the_docs_speak_of_the_product_only() -> None:
    """No development history in the documentation: no session or issue numbers."""
    found = [f"{p.name}: {m[0]}" for p in PAGES for m in _HISTORY.finditer(p.read_text(encoding="utf-8"))]
    assert not found
