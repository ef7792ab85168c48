"""`cl sweep`: grid x seeds, one directory per run, finished runs skipped on restart, an unfinished
one continued, a report over the lot, and bad grids refused before anything runs."""

from __future__ import annotations

import json

import pytest
import yaml

from cl.callbacks.base import Callback
from cl.cli import main
from cl.run import run
from cl.sweep import build_sweep, parse_grid, run_name, run_names
from tests.helpers import tiny_config


def base_config(tmp_path):
    cfg = tiny_config(tmp_path, "simplecil")
    cfg["threads"] = 1
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_grid_and_seeds_one_directory_each_then_skip_on_restart(tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["sweep", str(base_config(tmp_path)), "--grid", "strategy.head=ncm,lda", "--seeds", "0,1", "--out", str(out)]
    assert main(args) == 0
    names = sorted(p.parent.name for p in out.glob("*/metrics.json"))
    assert names == ["strategy.head=lda,seed=0", "strategy.head=lda,seed=1",
                     "strategy.head=ncm,seed=0", "strategy.head=ncm,seed=1"]
    cfg = yaml.safe_load((out / "strategy.head=lda,seed=1" / "config.yaml").read_text())
    assert cfg["strategy"]["head"] == "lda" and cfg["seed"] == 1 and cfg["threads"] == 1
    page = (out / "report.html").read_text()
    assert "strategy.head=lda" in page and "±" in page and "4 runs in 2 configs" in page
    printed = capsys.readouterr().out.replace("\n", "")
    assert f"report: {out / 'report.html'}" in printed
    assert main(args) == 0  # again: everything is finished
    printed = capsys.readouterr().out
    assert printed.count("finished already, skipped") == 4 and "resuming" not in printed


class StopAt(Callback):
    def before_experience(self, agent, exp):
        if exp.id == 1:
            raise RuntimeError("stop")


def test_sweep_file_renames_a_component_and_continues_an_unfinished_run(tmp_path, capsys):
    base_config(tmp_path)
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "base": "base.yaml", "out": str(tmp_path / "sw"),
        "grid": {"strategy.name": ["simplecil", "finetune"]}, "set": ["eval.batch_size=32"],
    }))
    sweep = build_sweep(str(sweep_file), [], None, [], None)
    finetune = sweep.config({"strategy.name": "finetune"})
    assert finetune.strategy.name == "finetune" and "head" not in finetune.strategy.params  # simplecil's params dropped
    assert finetune.eval.batch_size == 32
    with pytest.raises(RuntimeError):  # a run that stopped after its first experience
        run(finetune, extra_callbacks=[StopAt()])
    assert main(["sweep", str(sweep_file)]) == 0
    printed = capsys.readouterr().out
    assert "resuming" in printed and "experiences [0] already done" in printed
    metrics = json.loads((tmp_path / "sw" / "strategy.name=finetune" / "metrics.json").read_text())
    assert metrics["experiences_done"] == 3
    manifest = yaml.safe_load((tmp_path / "sw" / "sweep.yaml").read_text())
    assert manifest["grid"] == {"strategy.name": ["simplecil", "finetune"]}
    assert main(["sweep", str(tmp_path / "sw" / "sweep.yaml")]) == 0  # the manifest repeats the sweep
    assert capsys.readouterr().out.count("finished already, skipped") == 2


def test_grid_values_are_yaml():
    assert parse_grid(["strategy.lr=0.1,1e-2", "strategy.layers=[1, 2],[3]", "strategy.name=sema"]) == {
        "strategy.lr": [0.1, "1e-2"], "strategy.layers": [[1, 2], [3]], "strategy.name": ["sema"],
    }
    assert run_name({"strategy.layers": [-3, -1], "seed": 0}) == "strategy.layers=[-3,-1],seed=0"
    assert len(set(run_names([{"a": "x y"}, {"a": "x/y"}]))) == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--grid", "strategy.head"], "must look like key=value1,value2"),
        (["--seeds", "a,b"], "comma-separated integers"),
        (["--grid", "strategy.heda=ncm,lda"], "unknown key 'heda'"),
        (["--grid", "strategy.name=simplecil,sem"], "unknown strategy 'sem'"),
    ],
)
def test_bad_sweeps_exit_2_before_any_run(tmp_path, capsys, args, message):
    out = tmp_path / "sweep"
    assert main(["sweep", str(base_config(tmp_path)), "--out", str(out), *args]) == 2
    assert message in capsys.readouterr().err.replace("\n", " ")
    assert not list(out.glob("*/config.yaml"))
