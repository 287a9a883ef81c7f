"""The documents' result tables (scripts/benchmark_tables.py) match the result files they cite, and
the documents carry no build history."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import load_script

ROOT = Path(__file__).resolve().parent.parent


def _script():
    return load_script("benchmark_tables")


def test_the_documents_show_what_the_result_files_hold():
    tables = _script()
    for doc in ("README.md", "BENCHMARKS.md"):
        text = (ROOT / doc).read_text()
        assert tables.render(text) == text, f"{doc} is out of date: run python scripts/benchmark_tables.py"


def test_every_cited_result_file_exists_and_every_result_file_is_cited():
    docs = (ROOT / "README.md").read_text() + (ROOT / "BENCHMARKS.md").read_text()
    cited = set(re.findall(r"benchmarks/[\w./-]+\.(?:json|png)(?!\w)", docs))
    assert all((ROOT / c).is_file() for c in cited), [c for c in cited if not (ROOT / c).is_file()]
    files = {str(p.relative_to(ROOT)) for p in (ROOT / "benchmarks").glob("*.*")}
    assert files <= cited, f"result files no document cites: {sorted(files - cited)}"


def test_the_documents_tell_no_history():
    for doc in ("README.md", "BENCHMARKS.md"):
        text = (ROOT / doc).read_text().lower()
        for phrase in (
            "this session",
            "prior session",
            "earlier session",
            "(issue",
            "since this session",
            "superseded",
        ):
            assert phrase not in text, f"{doc} says {phrase!r}"
