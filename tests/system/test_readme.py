"""Every `python` block of README.md runs as written, on its own, from the repository root: a
reader copies one block, not the page (issue 36, item 5)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import ROOT

_BLOCK = re.compile(r"^(?P<indent>[ \t]*)```python\n(?P<code>.*?)^(?P=indent)```", re.S | re.M)


def readme_blocks() -> list[tuple[int, str]]:
    """(line number, code) of each python block, dedented (blocks inside list items too)."""
    text = (ROOT / "README.md").read_text()
    return [
        (text[: m.start()].count("\n") + 1, textwrap.dedent(m.group("code")))
        for m in _BLOCK.finditer(text)
    ]


def test_the_readme_has_python_blocks():
    assert len(readme_blocks()) >= 4


@pytest.mark.slow
@pytest.mark.parametrize(
    "line, code", readme_blocks(), ids=lambda v: str(v) if isinstance(v, int) else ""
)
def test_readme_block_runs_on_its_own(line, code):
    env = dict(os.environ, MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    last = (run.stderr.strip().splitlines() or ["(no output)"])[-1]
    assert run.returncode == 0, f"README.md block at line {line} fails: {last}"
