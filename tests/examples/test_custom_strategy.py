"""docs/writing-a-strategy.md, followed literally: its code is examples/custom_strategy.py, and its smoke
command runs (with the run directory moved into a temporary folder) and resumes to the same metrics."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import yaml

from cl.cli import main

ROOT = Path(__file__).resolve().parents[2]
GUIDE = (ROOT / "docs" / "writing-a-strategy.md").read_text()
EXAMPLE = (ROOT / "examples" / "custom_strategy.py").read_text()


def guide_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", GUIDE, flags=re.S)


def test_the_guide_shows_the_example_code_verbatim():
    code = "\n".join(guide_blocks("python"))
    body = EXAMPLE[EXAMPLE.index("from __future__") :]  # the module docstring is described in prose
    for chunk in body.split("\n\n\n"):  # every top-level piece of the example appears in the guide
        assert chunk.strip() in code, chunk[:80]


def test_the_guide_smoke_command_runs_and_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    smoke = next(line for block in guide_blocks("bash") for line in block.splitlines()
                 if line.startswith("cl run") and "--import" in line and "synthetic" in line)
    args = shlex.split(smoke)[1:]
    out = tmp_path / "proto"
    args[args.index("--out") + 1] = str(out)
    assert main([*args, "--set", "progress=false", "--set", "threads=1", "--no-report"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["final_accuracy"] > 1 / 6 + 0.2  # well above chance on the 6-class synthetic stream
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["imports"] == ["examples/custom_strategy.py"] and cfg["strategy"]["name"] == "proto_adapter"
    again = tmp_path / "again"  # config.yaml alone repeats the run: it re-imports the strategy
    assert main(["run", str(out / "config.yaml"), "--out", str(again), "--no-report"]) == 0
    assert json.loads((again / "metrics.json").read_text())["accuracy_matrix"] == metrics["accuracy_matrix"]


def test_a_missing_plugin_is_a_clear_error(capsys):
    assert main(["run", "--import", "examples/nope.py", "--strategy", "proto_adapter"]) == 2
    assert "no such file" in capsys.readouterr().err
