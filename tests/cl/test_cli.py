"""`cl` end to end on tiny data, and clear errors (exit code 2) for bad input."""

from __future__ import annotations

import json

import pytest
import yaml

from cl.cli import main
from tests.helpers import tiny_config


def write_config(tmp_path, **overrides):
    cfg = tiny_config(tmp_path, "simplecil")
    cfg.update(overrides)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_list_shows_all_registries(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("finetune", "simplecil", "joint", "split_fmnist", "synthetic", "efficientnet_lite0",
                 "vit_tiny_test", "minilm", "console"):
        assert name in out, name


def test_list_one_kind_by_its_plural(capsys):
    assert main(["list", "strategies"]) == 0
    out = capsys.readouterr().out
    for name in ("sema", "mos", "lae", "key_retrieval", "replay", "aper"):
        assert name in out, name
    assert "split_fmnist" not in out and "[frozen, adapted]" in out  # descriptions are not read as markup
    assert main(["list", "strategy"]) == 0 and "sema" in capsys.readouterr().out
    assert main(["list", "strategis"]) == 2 and "unknown kind" in capsys.readouterr().err


def test_run_end_to_end_prints_matrix(tmp_path, capsys):
    path = write_config(tmp_path)
    assert main(["run", str(path), "--strategy", "finetune", "--set", "strategy.epochs=2"]) == 0
    out = capsys.readouterr().out
    assert "accuracy matrix" in out and "final accuracy" in out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["experiences_done"] == 3
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["strategy"]["epochs"] == 2


def test_resume_of_finished_run_reports_it(tmp_path, capsys):
    path = write_config(tmp_path)
    assert main(["run", str(path)]) == 0
    assert main(["run", "--resume", str(tmp_path / "run")]) == 0
    assert "already done" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--strategy", "sem"], "unknown strategy 'sem'"),
        (["--backbone", "efficientnet_lite"], "did you mean 'efficientnet_lite0'"),
        (["--scenario", "split_fmnst"], "unknown scenario"),
        (["--set", "strategy.lrr=0.1", "--strategy", "finetune"], "unknown key 'lrr'"),
        (["--set", "seeed=1"], "did you mean 'seed'"),
        (["--set", "strategy.epochs=many", "--strategy", "finetune"], "bad value"),
        (["--scenario", "split_digits", "--set", "scenario.class_order=[0, 1, 2]"], "missing [3, 4, 5"),
        (["--set", "scenario.n_experiences=4"], "cannot be split evenly"),
        (["--device", "cuda:7"], "CUDA is not available"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(tmp_path, capsys, args, message):
    path = write_config(tmp_path)
    assert main(["run", str(path), *args]) == 2
    err = capsys.readouterr().err
    assert message in err.replace("\n", " "), err


def test_malformed_yaml(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("strategy: {name: finetune\nseed: [")
    assert main(["run", str(path)]) == 2
    assert "malformed YAML" in capsys.readouterr().err


def test_missing_data_names_the_package(tmp_path, capsys):
    path = write_config(tmp_path, scenario={"name": "split_fmnist", "root": str(tmp_path / "nowhere")})
    assert main(["run", str(path)]) == 2
    assert "dataset-fashion-mnist" in capsys.readouterr().err


def test_missing_config_file(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_resume_rejects_result_changing_overrides(tmp_path, capsys):
    path = write_config(tmp_path)
    assert main(["run", str(path)]) == 0
    assert main(["run", "--resume", str(tmp_path / "run"), "--set", "strategy.lr=1"]) == 2
    assert "would change the results" in capsys.readouterr().err
    assert main(["run", "--resume", str(tmp_path / "not-a-run")]) == 2
