"""A run directory survives any crash: SIGKILL at random file operations, a full disk, a damaged newest checkpoint.

The killed runs are forked children of the test process (no second import of torch: a kill costs a fraction of a
second) that SIGKILL themselves at the k-th durable step of the run: an ``os.fsync``, an ``os.replace`` or a
training iteration. Steps are counted in an uninterrupted reference run first; each seed draws k from its own
quarter of them, so the kills spread over the whole run, most inside metrics, memory and checkpoint saves, and
two kills land on each side of the rename that commits a checkpoint.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest
import torch
import yaml
from rich.console import Console

import cl.checkpoint as checkpoint
import cl.memory.memory as memory_module
from cl.callbacks.base import Callback
from cl.checkpoint import has_checkpoint, load_checkpoint, load_memory, memory_generations
from cl.config import build_config
from cl.errors import CheckpointError
from cl.memory import ExperienceMemory
from cl.run import run
from tests.helpers import one_thread, tiny_config

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="forks and SIGKILLs runs (POSIX)")

PARAMS = {"finetune": {"epochs": 2}, "replay": {"epochs": 2, "budget": 12, "batch_size": 16}, "simplecil": {},
          "sema": {"epochs": 2, "batch_size": 32}}
RESUME_POINTS = {"sema"}  # runs that also save a resume point after every training step (kills land in those too)
VARYING = ("wall_time", "cpu_time", "phase_", "rss", "cuda")  # metrics.json keys that measure the machine, not the run


def config(tmp_path: Path, strategy: str) -> dict[str, Any]:
    cfg = tiny_config(tmp_path, strategy, **PARAMS[strategy])
    if strategy in RESUME_POINTS:  # SEMA trains layer by layer: resuming inside a later loop fast-forwards earlier ones
        cfg["checkpoint_interval_s"] = 1e-6
    return cfg


def run_quietly(cfg: dict[str, Any], resume: bool = False, callbacks: list[Callback] | None = None) -> dict[str, Any]:
    with one_thread():
        return run(build_config(cfg), resume=resume, extra_callbacks=callbacks, console=Console(file=io.StringIO()))


@dataclass
class Outcome:
    """What a finished run left: metrics.json without timings, events without times, the memory's entries."""

    metrics: dict[str, Any]
    events: list[dict[str, Any]]
    memory: tuple[list[int], np.ndarray, list[dict[str, Any]]]

    @classmethod
    def of(cls, run_dir: Path) -> Outcome:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
        entries = ExperienceMemory.load(run_dir / "memory").entries()
        return cls(
            {k: v for k, v in metrics.items() if not any(s in k for s in VARYING)},
            [{k: v for k, v in e.items() if k != "t"} for e in events],
            (entries.ids.tolist(), entries.vectors, entries.metadata),
        )

    def assert_equal(self, other: Outcome) -> None:
        assert self.metrics == other.metrics
        kinds = [(e["experience"], e["kind"]) for e in self.events]
        assert kinds == [(e["experience"], e["kind"]) for e in other.events]  # each experience starts and ends once
        assert self.events == other.events
        assert self.memory[0] == other.memory[0] and self.memory[2] == other.memory[2]
        np.testing.assert_array_equal(self.memory[1], other.memory[1])


class Tripwire(Callback):
    """Counts the durable steps of a run (``os.fsync``, ``os.replace``, training iterations) while ``armed``, and
    SIGKILLs the process just before step ``kill_at``."""

    def __init__(self, kill_at: int | None = None) -> None:
        self.kill_at = kill_at
        self.steps: list[str] = []

    def step(self, what: str) -> None:
        self.steps.append(what)
        if len(self.steps) == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def after_iteration(self, agent: Any, iteration: int, loss: float) -> None:
        self.step("iteration")

    def _wrap(self, name: str, describe: Callable[..., str]) -> Callable[..., Any]:
        real = getattr(os, name)

        def counted(*args: Any) -> Any:
            self.step(f"{name} {describe(*args)}")
            return real(*args)

        return counted

    @contextmanager
    def armed(self):
        patch = pytest.MonkeyPatch()
        patch.setattr(os, "fsync", self._wrap("fsync", lambda fd: _fd_name(fd)))
        patch.setattr(os, "replace", self._wrap("replace", lambda src, dst: Path(dst).name))
        try:
            yield self
        finally:
            patch.undo()


def _fd_name(fd: int) -> str:
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}")).name
    except OSError:
        return "?"


def run_killed(cfg: dict[str, Any], kill_at: int) -> None:
    """Run ``cfg`` in a forked child that SIGKILLs itself at durable step ``kill_at``; fails if it was not killed."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 3
        try:
            signal.alarm(120)  # a hung child dies instead of hanging the test
            torch.set_num_threads(1)
            faiss.omp_set_num_threads(1)
            trip = Tripwire(kill_at)
            with trip.armed():
                run(build_config(cfg), extra_callbacks=[trip], console=Console(file=io.StringIO()))
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"child ended with status {status}"


def assert_readable(run_dir: Path) -> str:
    """Every file of a (killed) run directory parses; returns what its checkpoint holds, in words."""
    build_config(yaml.safe_load((run_dir / "config.yaml").read_text()))
    if (run_dir / "metrics.json").exists():
        json.loads((run_dir / "metrics.json").read_text())
    if (run_dir / "events.jsonl").exists():
        for line in (run_dir / "events.jsonl").read_text().splitlines():
            json.loads(line)
    if (run_dir / "memory" / "CURRENT").exists():
        ExperienceMemory.load(run_dir / "memory")  # the live generation, complete even if ahead of the checkpoint
    if not has_checkpoint(run_dir / "checkpoints"):
        return "no checkpoint"
    payload = load_checkpoint(run_dir / "checkpoints")
    load_memory(run_dir / "memory", payload["memory"])
    return f"experiences {payload['experiences_done']}, memory {payload['memory']['generation']}"


def assert_tidy(run_dir: Path) -> None:
    """No temporary or orphaned files; the newest checkpoint holds every experience; every memory generation on
    disk is live or named by a checkpoint (a kill after the last commit may leave one older checkpoint)."""
    ckpts = {p.name for p in (run_dir / "checkpoints").iterdir()}
    stems = sorted({name.rsplit(".", 1)[0] for name in ckpts})
    assert ckpts == {f"{stem}.{ext}" for stem in stems for ext in ("json", "pt")}, ckpts
    assert stems[-1] == "ckpt-000003" and len(stems) <= 3, stems
    names = {p.name for p in (run_dir / "memory").iterdir()} - {"CURRENT", "KEEP"}
    in_use = memory_generations(run_dir / "checkpoints") | {(run_dir / "memory" / "CURRENT").read_text().strip()}
    assert names <= in_use, names
    assert not list(run_dir.glob("*.tmp"))


@dataclass
class Reference:
    cfg_of: Callable[[Path], dict[str, Any]]
    outcome: Outcome
    steps: list[str]


@pytest.fixture(scope="module", params=["finetune", "replay", "sema"])
def reference(request, tmp_path_factory) -> Reference:
    """The uninterrupted run of a strategy, with the durable steps it took."""
    strategy = request.param
    cfg = config(tmp_path_factory.mktemp(f"ref-{strategy}"), strategy)
    trip = Tripwire()
    with trip.armed():
        run_quietly(cfg, callbacks=[trip])
    return Reference(lambda path: config(path, strategy), Outcome.of(Path(cfg["out"])), trip.steps)


COMMIT = "replace ckpt-000002.json"  # the rename that commits the checkpoint of experience 1


def kill_point(steps: list[str], point: int | str) -> int:
    """The step to kill before: seed ``point`` draws one from its quarter of the run; ``before commit`` leaves the
    memory of experience 1 saved but not its checkpoint, ``after commit`` both, the memory not yet pruned."""
    if isinstance(point, str):
        return steps.index(COMMIT) + (1 if point == "before commit" else 2)
    lo, hi = point * len(steps) // 4, (point + 1) * len(steps) // 4
    return lo + 1 + int(np.random.default_rng(point).integers(hi - lo))


@pytest.mark.parametrize("point", [0, 1, 2, 3, "before commit", "after commit"])
def test_sigkill_anywhere_then_resume_matches_uninterrupted(reference, tmp_path, point):
    kill_at = kill_point(reference.steps, point)
    cfg = reference.cfg_of(tmp_path)
    run_dir = Path(cfg["out"])
    run_killed(cfg, kill_at)
    state = assert_readable(run_dir)
    print(f"killed before step {kill_at}/{len(reference.steps)} ({reference.steps[kill_at - 1]}): {state}")
    if point == "before commit":  # the memory is a generation ahead of the checkpoint
        assert state == "experiences [0], memory gen-000001"
        assert (run_dir / "memory" / "CURRENT").read_text().strip() == "gen-000002"
    run_quietly(cfg, resume=True)
    Outcome.of(run_dir).assert_equal(reference.outcome)
    assert_tidy(run_dir)


@pytest.fixture(scope="module")
def simplecil(tmp_path_factory) -> Outcome:
    cfg = config(tmp_path_factory.mktemp("ref-simplecil"), "simplecil")
    run_quietly(cfg)
    return Outcome.of(Path(cfg["out"]))


def _truncate(pt: Path, man: Path) -> None:
    pt.write_bytes(pt.read_bytes()[: pt.stat().st_size // 2])


def _foreign(pt: Path, man: Path) -> None:
    torch.save({"something": "else"}, pt)


def _newer_format(pt: Path, man: Path) -> None:
    man.write_text(json.dumps({**json.loads(man.read_text()), "format_version": 99}))


@pytest.mark.parametrize(("damage", "says"), [(_truncate, "does not match its checksum"),
                                              (_foreign, "does not match its checksum"),
                                              (_newer_format, "has format 99")])
def test_unreadable_newest_checkpoint_names_the_last_good_one(simplecil, tmp_path, damage, says):
    cfg = config(tmp_path, "simplecil")
    run_quietly(cfg)
    ckpts = tmp_path / "run" / "checkpoints"
    damage(ckpts / "ckpt-000003.pt", ckpts / "ckpt-000003.json")
    with pytest.raises(CheckpointError, match=says) as err:
        load_checkpoint(ckpts)
    assert "The last good checkpoint is ckpt-000002 (experiences [0, 1], memory gen-000002)" in str(err.value)
    with pytest.raises(CheckpointError, match="last good checkpoint is ckpt-000002"):
        run_quietly(cfg, resume=True)
    for path in str(err.value).split("delete ")[1].split(" and resume")[0].split():  # follow the advice
        Path(path).unlink()
    run_quietly(cfg, resume=True)
    Outcome.of(tmp_path / "run").assert_equal(simplecil)
    assert_tidy(tmp_path / "run")


def test_no_readable_checkpoint_says_start_again(tmp_path):
    cfg = config(tmp_path, "simplecil")
    run_quietly(cfg)
    for pt in (tmp_path / "run" / "checkpoints").glob("*.pt"):
        _truncate(pt, pt)
    with pytest.raises(CheckpointError, match=r"no earlier checkpoint .* is readable: start the run again"):
        load_checkpoint(tmp_path / "run" / "checkpoints")


class DiskFullAt(Callback):
    """Makes ``target`` raise ENOSPC from the start of experience ``exp_id``."""

    def __init__(self, exp_id: int) -> None:
        self.exp_id, self.armed = exp_id, False

    def before_experience(self, agent: Any, exp: Any) -> None:
        self.armed = self.armed or exp.id == self.exp_id

    def wrap(self, target: Callable[..., Any]) -> Callable[..., Any]:
        def full(*args: Any, **kwargs: Any) -> Any:
            if self.armed:
                raise OSError(errno.ENOSPC, "No space left on device")
            return target(*args, **kwargs)

        return full


@pytest.mark.parametrize("where", ["checkpoint", "memory"])
def test_disk_full_while_saving_keeps_the_previous_checkpoint_and_memory(simplecil, tmp_path, monkeypatch, where):
    full = DiskFullAt(1)
    if where == "checkpoint":
        monkeypatch.setattr(checkpoint, "write_atomic", full.wrap(checkpoint.write_atomic))
    else:
        monkeypatch.setattr(memory_module.faiss, "write_index", full.wrap(memory_module.faiss.write_index))
    cfg = config(tmp_path, "simplecil")
    with pytest.raises(CheckpointError, match=f"the disk is full: (saving|writing) .*{where}") as err:
        run_quietly(cfg, callbacks=[full])
    assert "checkpoint ckpt-000001 (experiences [0], memory gen-000001) is kept" in str(err.value)
    assert "free some space and resume" in str(err.value)
    run_dir = tmp_path / "run"
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["ckpt-000001.json", "ckpt-000001.pt"]  # nothing half-written is left
    payload = load_checkpoint(run_dir / "checkpoints")
    assert payload["experiences_done"] == [0]
    assert load_memory(run_dir / "memory", payload["memory"]).count(kind="task") == 1
    monkeypatch.undo()
    run_quietly(cfg, resume=True)
    Outcome.of(run_dir).assert_equal(simplecil)


def test_leftovers_of_a_killed_save_are_removed_by_the_next_one(tmp_path):
    ckpts = tmp_path / "ckpts"
    checkpoint.save_checkpoint(ckpts, {"experiences_done": [0]})
    (ckpts / "ckpt-000002.pt").write_bytes(b"half")  # killed before its manifest was committed
    (ckpts / "ckpt-000002.json.tmp").write_text("{")
    assert load_checkpoint(ckpts)["experiences_done"] == [0]
    for done in ([0, 1], [0, 1, 2]):
        checkpoint.save_checkpoint(ckpts, {"experiences_done": done})
    assert sorted(p.name for p in ckpts.iterdir()) == [f"ckpt-{n:06d}.{e}" for n in (2, 3) for e in ("json", "pt")]
    assert load_checkpoint(ckpts)["experiences_done"] == [0, 1, 2]


def test_a_legacy_checkpoint_still_loads(tmp_path):
    ckpts = tmp_path / "ckpts"
    checkpoint.save_checkpoint(ckpts, {"experiences_done": [0]})
    for ext in ("pt", "json"):  # the layout before numbered checkpoints
        shutil.move(ckpts / f"ckpt-000001.{ext}", ckpts / f"last.{ext}")
    assert has_checkpoint(ckpts) and load_checkpoint(ckpts)["experiences_done"] == [0]
    checkpoint.save_checkpoint(ckpts, {"experiences_done": [0, 1]})
    checkpoint.save_checkpoint(ckpts, {"experiences_done": [0, 1, 2]})
    assert not (ckpts / "last.json").exists() and load_checkpoint(ckpts)["experiences_done"] == [0, 1, 2]
