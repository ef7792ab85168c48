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


def test_list_one_kind_by_its_plural(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # no wrapping, whatever names earlier tests registered
    assert main(["list", "strategies"]) == 0
    out = capsys.readouterr().out
    for name in ("sema", "mos", "lae", "key_retrieval", "replay", "aper"):
        assert name in out, name
    assert "split_fmnist" not in out and "[frozen, adapted]" in out  # descriptions are not read as markup
    assert main(["list", "strategy"]) == 0 and "sema" in capsys.readouterr().out
    assert main(["list", "strategis"]) == 2 and "unknown kind" in capsys.readouterr().err


def _rows(out: str) -> dict[str, list[str]]:
    """The cells of a rich table's rows, by their first cell (wrapped cells joined)."""
    rows: dict[str, list[str]] = {}
    last = None
    for line in out.splitlines():
        if not line.startswith("│"):
            continue
        cells = [c.strip() for c in line.strip("│").split("│")]
        if cells[0]:
            last = cells[0]
            rows[last] = cells
        elif last is not None:
            rows[last] = [" ".join(filter(None, (a, b))) for a, b in zip(rows[last], cells, strict=True)]
    return rows


def test_list_one_entry_shows_its_parameters_types_defaults_and_meaning(capsys, monkeypatch):
    from cl.registry import STRATEGIES

    monkeypatch.setenv("COLUMNS", "300")  # one table row per parameter
    assert main(["list", "strategies", "sema"]) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    assert out.startswith("strategy sema: Self-expanding adapters")
    assert list(rows) == list(STRATEGIES.params_model("sema").model_fields)
    assert rows["tau"][1:3] == ["float", "2.0"] and rows["tau"][3].startswith("expansion threshold")
    assert rows["descriptor_epochs"][1:3] == ["int >= 0", "20"]
    assert rows["optimizer"][1:3] == ["'adam' | 'adamw' | 'sgd'", "'adam'"]
    assert rows["route_by"][3].startswith("what picks the adapters of an input")  # from __init__'s docstring
    assert rows["epochs"][3] == "training epochs per experience."  # inherited from Strategy's Args
    assert "set with --set strategy.NAME=VALUE" in out

    assert main(["list", "scenarios", "synthetic"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert rows["n_classes"][1:] == ["int", "6", "how many classes (one pattern each)."]
    assert main(["list", "backbones", "efficientnet_lite0"]) == 0
    assert _rows(capsys.readouterr().out)["img_size"][1:3] == ["int", "224"]
    assert main(["list", "heads", "lda"]) == 0
    assert "head_kw" in capsys.readouterr().out
    assert main(["list", "routers", "descriptor"]) == 0
    assert "hard" in _rows(capsys.readouterr().out)


def test_list_an_imported_strategy_and_bad_names(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    assert main(["list", "strategies", "proto_adapter", "--import", "examples/custom_strategy.py"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert rows["temperature"][1:3] == ["float", "16.0"] and rows["epochs"][1:3] == ["int >= 0", "2"]
    assert main(["list", "strategies", "semaa"]) == 2
    assert "unknown strategy 'semaa'; did you mean 'sema'?" in capsys.readouterr().err
    assert main(["list", "sema"]) == 2
    assert "for the strategy 'sema': cl list strategies sema" in capsys.readouterr().err


def test_every_parameter_of_every_strategy_backbone_scenario_and_head_is_documented():
    """``cl list KIND NAME`` shows a line for each of clagent's own entries (plugins imported by other tests are not
    held to it; router parameters, set through ``router_kw``, neither)."""
    from cl.plugins import source_of
    from cl.registry import BACKBONES, HEADS, SCENARIOS, STRATEGIES

    missing = {f"{reg.kind} {name}": [p.name for p in reg.params(name) if not p.doc]
               for reg in (STRATEGIES, BACKBONES, SCENARIOS, HEADS) for name in reg.names()
               if source_of(reg.get(name)) is None}
    assert not {k: v for k, v in missing.items() if v}


def test_run_help_lists_the_config_keys(capsys):
    from cl.config import RunConfig

    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    keys = out[out.index("config keys"):]
    for key in RunConfig.model_fields:
        assert f"\n  {key} (" in keys, key
    assert "threads (null): CPU threads torch uses" in keys


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
