"""docs/your-data.md, followed literally: its Python blocks run in order in one session (in a temporary folder), its
`cl run` lines run, the scenario it shows is examples/your_scenario.py, and the messages it quotes are the ones
raised."""

from __future__ import annotations

import contextlib
import io
import json
import shlex
import warnings
from pathlib import Path

import pytest

from cl.cli import main
from tests.helpers import doc_blocks

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "your-data.md"
EXAMPLE = (ROOT / "examples" / "your_scenario.py").read_text()
QUIET = ["--set", "progress=false", "--set", "threads=1", "--no-report"]


def cl_runs() -> list[list[str]]:
    return [shlex.split(line)[1:] for block in doc_blocks(DOC, "bash") for line in block.splitlines()
            if line.startswith("cl run")]


def test_the_scenario_shown_is_the_example_file():
    (shown,) = [b for b in doc_blocks(DOC) if "@register_scenario" in b]
    assert shown in EXAMPLE


@pytest.mark.realdata
def test_every_example_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    outputs = []
    for code in doc_blocks(DOC):
        if "@register_scenario" in code:  # examples/your_scenario.py, run by its `cl run` line below
            continue
        out = io.StringIO()
        with contextlib.redirect_stdout(out), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # avalanche's imports warn about third parties
            exec(compile(code, str(DOC), "exec"), scope)
        outputs.append(out.getvalue())

    # arrays -> class-incremental: 5 experiences of 2 classes; learned to well above chance (0.1)
    assert outputs[0].startswith("class [[")
    metrics = scope["metrics"]
    assert len(metrics["accuracy_matrix"]) == 5 and metrics["final_accuracy"] > 0.6
    # task- and domain-incremental from tensors
    assert "task [0, 1, 2, 3, 4]" in outputs[2] and "domain ['upright', 'turned']" in outputs[2]
    # text: both new sentences go to their topic (weather 1, sport 0)
    assert outputs[3].strip() == "[1, 0]"
    # a folder, torchvision, Avalanche, by hand
    assert len(scope["train"]) == 80 and scope["stream"].kind == "class" and len(scope["back"].train_stream) == 5
    assert scope["sites"].kind == "domain" and (tmp_path / "my-images" / "test" / "digit0").is_dir()
    # the messages it quotes
    (quoted,) = doc_blocks(DOC, "text")
    assert outputs[-1].splitlines() == quoted.strip().splitlines()

    image_folder, your_scenario = cl_runs()
    assert main([*image_folder, *QUIET]) == 0
    folder_run = json.loads((tmp_path / "runs" / "my-images" / "metrics.json").read_text())
    assert len(folder_run["accuracy_matrix"]) == 5 and folder_run["final_accuracy"] > 0.5

    monkeypatch.chdir(ROOT)  # --import names examples/your_scenario.py from the repository root
    your_scenario[your_scenario.index("--out") + 1] = str(tmp_path / "my-digits")
    assert main([*your_scenario, *QUIET]) == 0
    assert len(json.loads((tmp_path / "my-digits" / "metrics.json").read_text())["accuracy_matrix"]) == 2
