"""How ``cl.run`` builds a run: the scenario's data loads while the backbone's libraries import."""

from __future__ import annotations

import sys
import textwrap

import pytest

from cl.backbones import import_libraries
from cl.errors import ConfigError, DataError
from tests.helpers import python_json

# in a fresh process (timm not imported yet): a scenario that finishes only once timm is being imported meanwhile
SCRIPT = textwrap.dedent("""
    import json, sys, threading, time
    from cl.config import build_config
    from cl.registry import SCENARIOS, register_scenario
    from cl.run import run
    from tests.helpers import TINY_SCENARIO, tiny_config

    seen = {}

    @register_scenario("waits_for_timm")
    def waits_for_timm(n_classes: int, n_experiences: int, train_per_class: int, test_per_class: int,
                       image_size: int):
        seen["on_main_thread"] = threading.current_thread() is threading.main_thread()
        deadline = time.monotonic() + 20
        while "timm" not in sys.modules:
            if time.monotonic() > deadline:
                raise RuntimeError("timm was not imported while the scenario loaded")
            time.sleep(0.005)
        seen["timm_imported_meanwhile"] = True
        return SCENARIOS.create("synthetic", n_classes=n_classes, n_experiences=n_experiences,
                                train_per_class=train_per_class, test_per_class=test_per_class, image_size=image_size)

    cfg = tiny_config(__import__("pathlib").Path(sys.argv[1]), "simplecil")
    cfg["scenario"]["name"] = "waits_for_timm"
    metrics = run(build_config(cfg))
    print(json.dumps({**seen, "final": metrics["final_accuracy"]}))
""")


def test_the_scenario_loads_while_the_backbone_libraries_import(tmp_path):
    seen = python_json(SCRIPT, str(tmp_path))
    assert seen["on_main_thread"] is False and seen["timm_imported_meanwhile"] is True
    assert seen["final"] > 0.5  # the run itself is the usual one


def test_a_scenario_error_reaches_the_caller_unchanged(tmp_path):
    from cl.config import build_config
    from cl.run import run
    from tests.helpers import tiny_config

    cfg = tiny_config(tmp_path, "simplecil")
    cfg["scenario"] = {"name": "split_fmnist", "root": str(tmp_path / "nowhere")}
    with pytest.raises(DataError, match=r"FashionMNIST file \S+ not found under .*nowhere"):
        run(build_config(cfg))
    assert not (tmp_path / "run" / "config.yaml").exists()  # nothing written for a run that could not be built


def test_import_libraries_leaves_names_it_does_not_know_to_create_backbone():
    import_libraries("efficientnet_lite0")  # timm
    assert "timm" in sys.modules
    import_libraries("no_such_backbone")  # an unregistered name is looked up as a timm ViT name by create_backbone
    from cl.backbones import create_backbone

    with pytest.raises(ConfigError, match="unknown backbone 'no_such_backbone'"):
        create_backbone("no_such_backbone")
