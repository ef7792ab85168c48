"""Loading a run directory, a saved agent or an experience memory never runs code from its files.

An attacker's checkpoint is a pickle whose unpickling runs a shell command (``os.system``), planted with a recomputed
manifest so every checksum matches: ``cl run --resume``, ``load_checkpoint`` and ``Agent.load`` refuse it with a
CheckpointError naming the file, and the command never runs. Payloads with missing keys or wrong types, and memory
directories with foreign files, are refused the same way. Run directories and agents saved by checkpoint format 1
(``tests/fixtures/format1``, pickled with the old code) still load, and resume bit for bit.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from rich.console import Console

from cl.agent import Agent
from cl.callbacks.base import Callback
from cl.checkpoint import PARTIAL, load_checkpoint, save_checkpoint
from cl.cli import main
from cl.config import build_config
from cl.errors import CheckpointError
from cl.interrupt import RunInterrupted
from cl.memory import ExperienceMemory
from cl.registry import SCENARIOS, STRATEGIES
from cl.run import load_run_config, run
from cl.seed import rng_state, rng_state_problem, set_rng_state
from tests.helpers import TINY_SCENARIO, SignalAt, close_states, one_thread, tiny_config

FIXTURE = Path(__file__).parents[1] / "fixtures" / "format1"
QUIET = Console(file=io.StringIO())
PARAMS = {"epochs": 2, "budget": 12, "train_blocks": 1}
SYSTEM = r"pickled (posix|nt|os)\.system"  # os.system, by the name pickle records


class Shell:
    """What an attacker pickles: unpickling it runs ``touch marker`` in a shell."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def plant(pt: Path, blob: bytes, **manifest_changes: Any) -> None:
    """Replace a checkpoint's payload by ``blob`` and recompute its manifest, as an attacker would."""
    pt.write_bytes(blob)
    man = pt.with_suffix(".json")
    manifest = json.loads(man.read_text())
    man.write_text(json.dumps({**manifest, "sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob),
                               **manifest_changes}))


def crafted(marker: Path, version: int = 2) -> bytes:
    return torch_bytes({"format_version": version, "experiences_done": [0], "strategy": {"w": Shell(marker)},
                        "callbacks": {}, "resume_point": Shell(marker)})


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> Path:
    """A replay run stopped inside experience 1: ``ckpt-000001`` (experience 0), ``partial-000001``, memory."""
    root = tmp_path_factory.mktemp("stopped")
    with one_thread(), pytest.raises(RunInterrupted):
        run(build_config(tiny_config(root, "replay", **PARAMS)), extra_callbacks=[SignalAt(1, 1)], console=QUIET)
    return root / "run"


@pytest.fixture
def run_dir(stopped_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(stopped_run, out)
    return out


@pytest.fixture(scope="module")
def saved_agent(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("agent") / "agent"
    stream = SCENARIOS.create("synthetic", **{k: v for k, v in TINY_SCENARIO.items() if k != "name"})
    with one_thread():
        agent = Agent("vit_tiny_test", "replay", strategy_params=PARAMS, device="cpu", progress=False)
        agent.learn(stream[0])
    return agent.save(path)


def resume(out: Path) -> dict[str, Any]:
    with one_thread():
        return run(load_run_config(out), resume=True, console=QUIET)


# ---- a crafted pickle never runs ------------------------------------------------------------------------------
def test_the_crafted_payload_runs_its_command_when_unpickled_unsafely(tmp_path):
    """The control: the payload below is live (what ``weights_only=False`` did), so its absence elsewhere counts."""
    marker = tmp_path / "ran"
    torch.load(io.BytesIO(crafted(marker)), weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("name", ["ckpt", PARTIAL])
@pytest.mark.parametrize("version", [2, 1])
def test_crafted_checkpoint_in_a_run_directory_is_refused(run_dir, tmp_path, capsys, name, version):
    marker = tmp_path / "ran"
    pt = run_dir / "checkpoints" / f"{name}-000001.pt"
    plant(pt, crafted(marker, version), format_version=version)
    with pytest.raises(CheckpointError, match=SYSTEM) as err:
        load_checkpoint(run_dir / "checkpoints", name)
    assert str(pt) in str(err.value)
    if version == 1:  # the allow-list of format 1 (numpy arrays) admits nothing more; the error says what to do
        advice = f"delete {pt} and {pt.with_suffix('.json')} and resume" if name == PARTIAL else "--overwrite"
        assert "an older clagent, format 1" in str(err.value) and advice in str(err.value)
    assert main(["run", "--resume", str(run_dir)]) == 2
    message = " ".join(capsys.readouterr().err.split())  # unwrapped
    assert f"{pt.name} is not a clagent checkpoint: it holds a pickled" in message
    assert main(["report", str(run_dir), "--out", str(tmp_path / "report.html")]) == 0  # reads no checkpoint
    assert not marker.exists()


def test_crafted_saved_agent_is_refused(saved_agent, tmp_path):
    agent_dir = tmp_path / "agent"
    shutil.copytree(saved_agent, agent_dir)
    marker = tmp_path / "ran"
    pt = agent_dir / "agent-000001.pt"
    plant(pt, crafted(marker))
    with pytest.raises(CheckpointError, match=SYSTEM) as err:
        Agent.load(agent_dir, device="cpu", progress=False)
    assert str(pt) in str(err.value)
    assert not marker.exists()


# ---- code a run's config.yaml imports runs only when named -----------------------------------------------------
def test_resume_imports_the_plugins_of_config_yaml_only_when_named(run_dir, tmp_path, capsys):
    marker = tmp_path / "ran"
    plugin = run_dir / "plugin.py"  # planted in the run directory, and named by its config
    plugin.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    cfg_file = run_dir / "config.yaml"
    cfg_file.write_text(cfg_file.read_text().replace("imports: []", f"imports:\n- {plugin}"))
    assert main(["run", "--resume", str(run_dir)]) == 2
    message = " ".join(capsys.readouterr().err.split())
    assert f"{cfg_file} imports {plugin}: resuming would run that code" in message
    assert f"resume with --import {plugin}" in message
    assert main(["run", "--resume", str(run_dir), "--import", str(plugin), "--import", "strategies.sema"]) == 2
    assert "--import strategies.sema: " in " ".join(capsys.readouterr().err.split())
    assert not marker.exists()
    assert main(["run", "--resume", str(run_dir), "--import", str(plugin), "--no-report"]) == 0  # named: trusted
    assert marker.exists() and json.loads((run_dir / "metrics.json").read_text())["experiences_done"] == 3


# ---- missing keys and wrong types -------------------------------------------------------------------------------
def a_weight(state: dict[str, Any]) -> str:
    return next(k for k in state if k.endswith("qkv.weight"))


MUTATIONS: dict[str, tuple[str, Callable[[dict[str, Any]], Any], str]] = {
    "no strategy": ("ckpt", lambda p: p.pop("strategy"), r"is not a valid clagent checkpoint: it has no 'strategy'"),
    "no callbacks": ("ckpt", lambda p: p.pop("callbacks"), r"it has no 'callbacks'"),
    "no experiences_done": ("ckpt", lambda p: p.pop("experiences_done"), r"it holds no experiences_done"),
    "experiences_done of strings": ("ckpt", lambda p: p.update(experiences_done=["0"]),
                                    r"'experiences_done' is not a list of experience ids"),
    "strategy not a dict": ("ckpt", lambda p: p.update(strategy=[1, 2]), r"'strategy' is a list, not a dict"),
    "a weight not a tensor": ("ckpt", lambda p: p["strategy"].update({a_weight(p["strategy"]): "w"}),
                              r"'strategy'\['[\w.]+'\] is a str, not a tensor"),
    "callbacks not dicts": ("ckpt", lambda p: p.update(callbacks={"0:MetricsCallback": 3}),
                            r"'callbacks' is not a dict of callback states"),
    "memory without generation": ("ckpt", lambda p: p.update(memory={"entries": 3}),
                                  r"'memory' is not \{'generation': str, 'entries': int\}"),
    "a weight of another shape": ("ckpt", lambda p: p["strategy"].update({a_weight(p["strategy"]):
                                                                          torch.zeros(3)}),
                                  r"ckpt-000001.pt: checkpoint does not fit this strategy \(RuntimeError"),
    "exemplar store without targets": ("ckpt", lambda p: p["strategy"]["exemplars._extra_state"].pop("targets"),
                                       r"ckpt-000001.pt: checkpoint does not fit this strategy \(KeyError"),
    "callback state without rows": ("ckpt", lambda p: p["callbacks"]["0:MetricsCallback"].pop("rows"),
                                    r"ckpt-000001.pt: the saved state of callback 0:MetricsCallback does not fit it"),
    "resume point without rng": ("partial", lambda p: p["resume_point"].pop("rng"), r"resume_point has no rng"),
    "resume point with a short numpy key": (
        "partial", lambda p: p["resume_point"]["rng"].update(numpy=("MT19937", [1, 2], 0, 0, 0.0)),
        r"resume_point's rng: its numpy state is not"),
    "resume point step not an int": ("partial", lambda p: p["resume_point"].update(step=1.5),
                                     r"resume_point's step must be ints"),
    "resume point optimizer not a state dict": ("partial", lambda p: p["resume_point"].update(optimizer={}),
                                                r"resume_point's optimizer is not an optimizer state dict"),
}


@pytest.mark.parametrize("case", MUTATIONS)
def test_payload_with_missing_keys_or_wrong_types_is_refused(run_dir, case):
    name, mutate, says = MUTATIONS[case]
    pt = run_dir / "checkpoints" / f"{name}-000001.pt"
    payload = torch.load(pt, weights_only=True)
    mutate(payload)
    plant(pt, torch_bytes(payload))
    with pytest.raises(CheckpointError, match=says) as err:
        resume(run_dir)
    assert pt.name in str(err.value)


def test_saved_agent_without_strategy_is_refused(saved_agent, tmp_path):
    agent_dir = tmp_path / "agent"
    shutil.copytree(saved_agent, agent_dir)
    pt = agent_dir / "agent-000001.pt"
    payload = torch.load(pt, weights_only=True)
    del payload["strategy"]
    plant(pt, torch_bytes(payload))
    with pytest.raises(CheckpointError, match=rf"{pt} is not a valid clagent checkpoint: it has no 'strategy'"):
        Agent.load(agent_dir, device="cpu", progress=False)
    spec = agent_dir / "agent_spec.json"
    spec.write_text(json.dumps({**json.loads(spec.read_text()), "strategy": ["replay"]}))
    with pytest.raises(CheckpointError, match=rf"{spec} is missing or mistypes strategy \(str\)"):
        Agent.load(agent_dir, device="cpu", progress=False)


def test_restore_of_a_payload_without_strategy_says_so(saved_agent):
    agent = Agent("vit_tiny_test", "replay", strategy_params=PARAMS, device="cpu", progress=False)
    with pytest.raises(CheckpointError, match="the checkpoint is not a valid clagent checkpoint: it has no 'strategy'"):
        agent.restore({"experiences_done": [], "callbacks": {}}, [])


# ---- what is saved is plain data ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("value", "says"), [
    ({1, 2}, r"a builtins.set, not tensors or plain data .*; save a sorted list"),
    (np.zeros(3), r"a numpy.ndarray, not tensors or plain data"),
    (np.float64(1.0), r"a numpy.float64"),
    (Shell(Path("x")), r"a tests.cl.test_safe_loading.Shell"),
])
def test_saving_anything_but_tensors_and_plain_data_is_refused(tmp_path, value, says):
    payload = {"experiences_done": [0], "strategy": {"pool._extra_state": {"frozen": value}}}
    where = re.escape(f"cannot save checkpoint ckpt-000001 in {tmp_path}: payload['strategy']['pool._extra_state']")
    with pytest.raises(CheckpointError, match=rf"{where}\['frozen'\] is {says}"):
        save_checkpoint(tmp_path, payload)
    assert list(tmp_path.iterdir()) == []


def test_random_states_are_plain_data_and_round_trip(tmp_path):
    state = rng_state()
    assert rng_state_problem(state) is None
    save_checkpoint(tmp_path, {"experiences_done": [], "rng": state})
    loaded = load_checkpoint(tmp_path)["rng"]
    expected = (np.random.rand(3), torch.rand(3))
    set_rng_state(loaded)
    np.testing.assert_array_equal(np.random.rand(3), expected[0])
    assert torch.equal(torch.rand(3), expected[1])


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


class FirstExperienceState(Callback):
    """Keeps the strategy's checkpoint state after the first experience."""

    state: Any = None

    def after_experience(self, agent: Any, exp: Any) -> None:
        if self.state is None:
            self.state = copy.deepcopy(agent.checkpoint_payload()["strategy"])


OWN = [n for n in STRATEGIES.names() if STRATEGIES.get(n).__module__.startswith("strategies.")]  # not plugins'
ROUND_TRIPS = [(name, {}) for name in OWN] + [("sema", {"router": "softmax"}), ("sema", {"router": "topk"})]


@pytest.mark.parametrize(("strategy", "params"), ROUND_TRIPS, ids=[f"{s}{p}" for s, p in ROUND_TRIPS])
def test_every_strategy_saves_plain_data_and_loads_it_back_identically(tmp_path, strategy, params):
    stream = SCENARIOS.create("synthetic", **{k: v for k, v in TINY_SCENARIO.items() if k != "name"})
    with one_thread():
        one_epoch = {"epochs": 1} if "epochs" in STRATEGIES.params_model(strategy).model_fields else {}
        agent = Agent("vit_tiny_test", strategy, strategy_params={**one_epoch, **params}, device="cpu",
                      progress=False)
        for exp in stream.experiences[:2]:
            agent.learn(exp)
        agent.save(tmp_path / "agent")
        loaded = Agent.load(tmp_path / "agent", device="cpu", progress=False)
        x = stream[0].test.inputs[:8]
        assert same(loaded.strategy.checkpoint_state(), agent.strategy.checkpoint_state())
        assert torch.equal(loaded.predict(x), agent.predict(x))


# ---- the experience memory ----------------------------------------------------------------------------------------
def rewrite_manifest(gen: Path, change: Callable[[dict[str, Any]], None] = lambda m: None) -> None:
    """Recompute every file's checksum in ``gen``'s manifest (after ``change``), as an attacker would."""
    man = gen / "manifest.json"
    manifest = json.loads(man.read_text())
    change(manifest)
    for fname, info in manifest["files"].items():
        if (gen / fname).is_file():
            blob = (gen / fname).read_bytes()
            info.update(sha256=hashlib.sha256(blob).hexdigest(), bytes=len(blob))
    man.write_text(json.dumps(manifest))


def sql(statement: str) -> Callable[[Path, Path], None]:
    def tamper(gen: Path, marker: Path) -> None:
        with sqlite3.connect(gen / "metadata.sqlite") as conn:
            conn.execute(statement)
        conn.close()
        rewrite_manifest(gen)

    return tamper


def replace(fname: str) -> Callable[[Path, Path], None]:
    def tamper(gen: Path, marker: Path) -> None:
        (gen / fname).write_bytes(torch_bytes(Shell(marker)))
        rewrite_manifest(gen)

    return tamper


def edit_manifest(change: Callable[[dict[str, Any]], None]) -> Callable[[Path, Path], None]:
    return lambda gen, marker: rewrite_manifest(gen, change)


MEMORY_TAMPERING: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "metadata replaced by a pickle": (replace("metadata.sqlite"), r"metadata.sqlite is not a readable SQLite"),
    "index replaced by a pickle": (replace("index-task.faiss"), r"index-task.faiss is not a FAISS index of a type"),
    "a trigger in the metadata": (sql("CREATE TRIGGER wipe AFTER INSERT ON entries BEGIN DELETE FROM entries; END"),
                                  r"metadata.sqlite holds trigger wipe besides the entries table"),
    "a view in the metadata": (sql("CREATE VIEW v AS SELECT 1"), r"holds view v besides"),
    "extra metadata not JSON": (sql("UPDATE entries SET extra = '{not json' WHERE kind = 'task'"),
                                r"metadata.sqlite has 1 malformed rows"),
    "an unknown kind": (sql("UPDATE entries SET kind = 'shell' WHERE kind = 'task'"), r"has 1 malformed rows"),
    "an index file outside the generation": (
        edit_manifest(lambda m: m["kinds"]["task"].update(file="../../config.yaml")),
        r"names '../../config.yaml' as the task index, which is not one of the files"),
    "a listed file outside the generation": (
        edit_manifest(lambda m: m["files"].update({"../CURRENT": {"sha256": "0", "bytes": 11}})),
        r"lists its files wrongly"),
    "kinds not an object": (edit_manifest(lambda m: m.update(kinds=["task"])), r"has an invalid manifest"),
}


@pytest.mark.parametrize("case", MEMORY_TAMPERING)
def test_tampered_memory_is_refused_without_running_anything(run_dir, tmp_path, case):
    tamper, says = MEMORY_TAMPERING[case]
    marker = tmp_path / "ran"
    memory = run_dir / "memory"
    tamper(memory / "gen-000001", marker)
    with pytest.raises(CheckpointError, match=says):
        ExperienceMemory.load(memory)
    with pytest.raises(CheckpointError, match=says):
        resume(run_dir)
    assert not marker.exists()


# ---- checkpoint format 1 ------------------------------------------------------------------------------------------
def test_a_format1_run_directory_resumes_from_its_resume_point_bit_identically(tmp_path):
    out = tmp_path / "format1"
    shutil.copytree(FIXTURE / "stopped" / "run", out)
    partial = out / "checkpoints" / "partial-000001.pt"
    assert json.loads(partial.with_suffix(".json").read_text())["format_version"] == 1
    assert "numpy.ndarray" in torch.serialization.get_unsafe_globals_in_checkpoint(partial)  # the allow-list is used
    console = Console(file=io.StringIO(), width=200)
    with one_thread():
        metrics = run(load_run_config(out), resume=True, console=console)
    assert "continuing experience 1 from step 1 of epoch 0" in console.file.getvalue()
    expected = json.loads((FIXTURE / "expected.json").read_text())
    assert metrics["accuracy_matrix"] == expected["accuracy_matrix"]
    first = FirstExperienceState()
    with one_thread():
        run(build_config(tiny_config(tmp_path / "ref", "replay", **PARAMS)), console=QUIET, extra_callbacks=[first])
    state = load_checkpoint(out / "checkpoints")["strategy"]
    ref = load_checkpoint(tmp_path / "ref" / "run" / "checkpoints")["strategy"]
    if same(load_checkpoint(FIXTURE / "stopped" / "run" / "checkpoints")["strategy"], first.state):
        assert same(state, ref)  # this machine computes experience 0 as the one that wrote the fixture did
    else:  # another CPU (its kernels round differently): the resumed run lands where this machine's own run does
        assert close_states(state, ref, atol=1e-4)
    for man in (out / "checkpoints").glob("*.json"):  # what the resumed run wrote is format 2, plain
        assert json.loads(man.read_text())["format_version"] == 2
        assert torch.serialization.get_unsafe_globals_in_checkpoint(man.with_suffix(".pt")) == []


def test_a_format1_saved_agent_loads_and_predicts_the_same(tmp_path):
    shutil.copytree(FIXTURE / "agent", tmp_path / "agent")
    agent = Agent.load(tmp_path / "agent", device="cpu", progress=False)
    stream = SCENARIOS.create("synthetic", **{k: v for k, v in TINY_SCENARIO.items() if k != "name"})
    expected = json.loads((FIXTURE / "agent_predictions.json").read_text())
    assert agent.predict(stream[0].test.inputs[:16]).tolist() == expected
