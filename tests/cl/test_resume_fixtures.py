"""Run directories written by the code before issue 15's moves (``tests/fixtures/format2``, made by
``tests/fixtures/make_format2.py``) resume from their resume point inside an experience and end bit for bit as the
same runs did uninterrupted then: the same metrics, the same final strategy state (every tensor's digest), the
same memory."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from rich.console import Console

from cl.run import load_run_config, run
from tests.fixtures.make_format2 import CASES, HERE, outcome
from tests.helpers import one_thread


@pytest.mark.parametrize("strategy", sorted(CASES))
def test_a_run_directory_of_the_code_before_the_moves_resumes_bit_identically(tmp_path: Path, strategy: str):
    out = tmp_path / "run"
    shutil.copytree(HERE / strategy / "run", out)
    console = Console(file=io.StringIO(), width=200)
    with one_thread():
        metrics = run(load_run_config(out), resume=True, console=console)
    assert "continuing experience 1 from step" in console.file.getvalue()
    expected = json.loads((HERE / strategy / "expected.json").read_text())
    got = json.loads(json.dumps(outcome(out, metrics)))  # as stored: JSON types
    assert got["metrics"] == expected["metrics"]
    assert got["memory"] == expected["memory"]
    assert got["state"] == expected["state"]
