"""Every Python snippet of README.md runs as written.

A snippet right after an ``<!-- UPDATE ... -->`` line documents an API that has not landed yet; it
is expected to fail until then, strictly: once it runs, this test fails
until the marker is removed, so no snippet stays exempt by accident.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from pldr_kernels import ops

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def snippets() -> list:
    text = README.read_text()
    params = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marks = []
        if before.startswith("<!-- UPDATE"):
            marks.append(pytest.mark.xfail(strict=True, reason=f"README.md:{line}: {before}"))
        params.append(pytest.param(match.group(1), id=f"README.md:{line}", marks=marks))
    return params


def test_readme_has_python_snippets():
    assert len(snippets()) >= 2


@pytest.mark.skipif(ops._LOAD_ERROR is not None, reason=f"{ops._LOAD_ERROR}")
@pytest.mark.parametrize("code", snippets())
def test_readme_snippet_runs_as_written(code):
    exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})
