"""The Python surface of ``Agent`` beyond learning: threads, the run's metrics after ``learn``, loading a saved agent
of a strategy of one's own, a forgotten ``super().before_experience`` and quiet loading."""

from __future__ import annotations

import textwrap

import pytest
import torch

from cl import plugins
from cl.agent import Agent
from cl.errors import CheckpointError, ConfigError, TrainingError
from cl.metrics import summarize
from cl.registry import STRATEGIES, register_strategy
from cl.run import run
from scenarios import create_scenario
from strategies.simplecil import SimpleCIL
from tests.helpers import TINY_SCENARIO, one_thread, tiny_config

SCENARIO = {k: v for k, v in TINY_SCENARIO.items() if k != "name"}


@pytest.fixture(scope="module")
def stream():
    return create_scenario("synthetic", **SCENARIO)


def test_threads_sets_torchs_cpu_threads():
    before = torch.get_num_threads()
    try:
        Agent("vit_tiny_test", "simplecil", device="cpu", progress=False, threads=1)
        assert torch.get_num_threads() == 1
        Agent("vit_tiny_test", "simplecil", device="cpu", progress=False, threads=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    for bad in (0, 1.5, True):
        with pytest.raises(ConfigError, match="threads must be an int >= 1"):
            Agent("vit_tiny_test", "simplecil", device="cpu", progress=False, threads=bad)


def test_metrics_after_learn_are_the_runs(stream, tmp_path):
    with one_thread():
        agent = Agent("vit_tiny_test", "finetune", device="cpu", progress=False)
        results = [agent.learn(exp) for exp in stream]
        written = run(tiny_config(tmp_path))  # the same stream, strategy and seed through cl run
    m = agent.metrics()
    rows = [r["accuracy"] for r in results]
    assert m["accuracy_matrix"] == rows
    want = summarize(rows, [r["accuracy_seen"] for r in results])
    for key in ("avg_incremental_accuracy", "final_accuracy", "avg_forgetting", "bwt", "forgetting_per_experience"):
        assert m[key] == want[key], key
    assert m["avg_forgetting"] > 0  # finetune forgets: the numbers are not trivially zero
    for key in ("accuracy_matrix", "avg_incremental_accuracy", "final_accuracy", "avg_forgetting", "bwt"):
        assert m[key] == written[key], key


def test_a_given_metrics_callback_is_the_one_reported():
    from cl.metrics import MetricsCallback

    mine = MetricsCallback()
    agent = Agent("vit_tiny_test", "simplecil", device="cpu", progress=False, callbacks=[mine])
    assert agent.metrics_callback is mine and agent.callbacks.callbacks.count(mine) == 1


class Forgetful(SimpleCIL):
    """Overrides ``before_experience`` without calling ``super()``."""

    def before_experience(self, exp) -> None:
        pass


class NoSuperAfter(SimpleCIL):
    """Overrides ``after_experience`` without calling ``super()``: fine, the base does nothing there."""

    def after_experience(self, exp) -> None:
        self.head.add_classes(exp.classes)
        self.update_statistics(self.head, exp.train)


def test_a_before_experience_without_super_is_an_error(stream):
    register_strategy("test_forgetful")(Forgetful)
    register_strategy("test_no_super_after")(NoSuperAfter)
    with one_thread():
        agent = Agent("vit_tiny_test", "test_forgetful", device="cpu", progress=False)
        with pytest.raises(TrainingError, match=r"Forgetful.before_experience did not call "
                                                r"super\(\).before_experience\(exp\)"):
            agent.learn(stream[0])
        fine = Agent("vit_tiny_test", "test_no_super_after", device="cpu", progress=False)
        assert fine.learn(stream[0])["accuracy_seen"] > 0.8


def test_a_mixin_first_needs_no_super_in_the_strategys_after_experience(stream):
    from cl.replay import with_replay

    register_strategy("test_no_super_after_replay")(with_replay(NoSuperAfter))
    with one_thread():
        agent = Agent("vit_tiny_test", "test_no_super_after_replay", device="cpu", progress=False,
                      strategy_params={"budget": 6})
        agent.learn(stream[0])
    assert len(agent.strategy.exemplars) == 6 and agent.memory.count("exemplar") == 6  # ReplayMixin's, run first


def test_a_statistics_head_without_update_is_named(stream):
    from torch import nn

    class NoUpdate(SimpleCIL):
        def after_experience(self, exp) -> None:
            self.update_statistics(nn.Identity(), exp.train)

    register_strategy("test_head_without_update")(NoUpdate)
    with one_thread(), pytest.raises(TrainingError, match=r"Identity has no update\(z, y\): a statistics head adds"):
        Agent("vit_tiny_test", "test_head_without_update", device="cpu", progress=False).learn(stream[0])


PLUGIN = '''
from strategies.simplecil import SimpleCIL
from cl.registry import register_strategy


@register_strategy("{name}")
class Mine(SimpleCIL):
    """SimpleCIL under another name, registered by a file of one's own."""
'''


def test_a_saved_agent_of_an_imported_strategy_names_its_module_and_loads_when_confirmed(stream, tmp_path,
                                                                                        monkeypatch):
    name = "test_saved_plugin_strategy"
    file = tmp_path / "mine.py"
    file.write_text(textwrap.dedent(PLUGIN.format(name=name)))
    plugins.import_plugin(str(file))
    with one_thread():
        agent = Agent("vit_tiny_test", name, device="cpu", progress=False)
        agent.learn(stream[0])
        agent.save(tmp_path / "agent")
    x = stream[0].test.inputs[:8]
    want = agent.predict(x)

    # a fresh process: the strategy is not registered, the file not imported
    monkeypatch.delitem(STRATEGIES._entries, name)
    monkeypatch.setattr(plugins, "_FILES", {})
    with pytest.raises(CheckpointError) as err:
        Agent.load(tmp_path / "agent", device="cpu", progress=False)
    message = str(err.value)
    assert f"uses strategy {name!r}, which is not registered" in message
    assert str(file.resolve()) in message and "imports=" in message and "runs no code by itself" in message
    assert name not in STRATEGIES  # the error path imported nothing

    loaded = Agent.load(tmp_path / "agent", device="cpu", progress=False, imports=[str(file)])
    assert torch.equal(loaded.predict(x), want)


def test_a_saved_agent_of_a_strategy_defined_in_a_script_says_so(stream, tmp_path, monkeypatch):
    class Local(SimpleCIL):
        """SimpleCIL defined where the agent is saved."""

    Local.__module__ = "__main__"
    monkeypatch.setitem(STRATEGIES._entries, "test_main_strategy", Local)
    with one_thread():
        agent = Agent("vit_tiny_test", "test_main_strategy", device="cpu", progress=False)
        agent.learn(stream[0])
        agent.save(tmp_path / "agent")
    monkeypatch.delitem(STRATEGIES._entries, "test_main_strategy")
    with pytest.raises(CheckpointError, match=r"defined in the script or notebook that saved the agent \(__main__\)"):
        Agent.load(tmp_path / "agent", device="cpu", progress=False)


def test_built_in_strategies_record_no_import(tmp_path, stream):
    import json

    with one_thread():
        agent = Agent("vit_tiny_test", "simplecil", device="cpu", progress=False)
        agent.learn(stream[0])
        agent.save(tmp_path / "agent")
    assert json.loads((tmp_path / "agent" / "agent_spec.json").read_text())["imports"] == []


@pytest.mark.realdata
def test_progress_off_silences_the_minilm_loading_bar(capfd):
    from cl.backbones import create_backbone
    from cl.progress import library_bars

    with library_bars(True):  # the bar this test expects to disappear is there when bars are on
        create_backbone("minilm")
    assert "Loading weights" in capfd.readouterr().err
    Agent("minilm", "simplecil", device="cpu", progress=False)
    assert "Loading weights" not in capfd.readouterr().err

