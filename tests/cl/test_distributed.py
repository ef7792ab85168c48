"""Distributed runs (2 gloo processes via ``cl run --nproc 2``) match one process; graceful SIGTERM stops."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cl import distributed as dist
from cl.callbacks.base import Callback
from cl.checkpoint import PARTIAL, has_checkpoint, load_checkpoint
from cl.config import build_config
from cl.distributed import local_rows
from cl.interrupt import RunInterrupted
from cl.run import run
from tests.helpers import TINY, gloo_group, state_differences, tiny_config

PLUGIN = Path(__file__).with_name("sigterm_plugin.py")


def cl_run(*args: str, timeout: int = 300, **env_vars: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1", **env_vars}
    return subprocess.run([sys.executable, "-m", "cl", "run", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def write_config(tmp_path: Path, name: str, strategy: str, imports: list[str] | None = None,
                 **params) -> tuple[Path, dict]:
    cfg = tiny_config(tmp_path / name, strategy, epochs=2, batch_size=25, **params)
    cfg["threads"] = 1
    if imports:
        cfg["imports"] = imports
    cfg["scenario"] = {**cfg["scenario"], "train_per_class": 30}  # batches 25, 25, 10: 13 + 12 rows per rank
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, cfg


def events(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]


def flat(matrix: list[list[float]]) -> list[float]:
    """An accuracy matrix's entries; tolerance 0.05 = one of the 24 test items of an experience."""
    return [a for row in matrix for a in row]


def strategy_state(run_dir: Path) -> dict[str, torch.Tensor]:
    state = load_checkpoint(run_dir / "checkpoints")["strategy"]
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("strategy,params", [
    ("sema", {}), ("replay", {"budget": 24}),
    ("finetune", {"plateau_delta": 0.1, "plateau_every": 2}),  # window means summed over the ranks: ends inside exp 0
])
def test_two_gloo_ranks_match_one_process(tmp_path, strategy, params):
    path, cfg = write_config(tmp_path, "dist", strategy, **params)
    proc = cl_run(str(path), "--nproc", "2", "--no-report")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    single = run(build_config({**cfg, "out": str(tmp_path / "single")}))
    dist_dir = Path(cfg["out"])
    syncs = [e for e in events(dist_dir) if e["kind"] == "sync"]
    assert len(syncs) == 3  # one check per experience
    for e in syncs:  # both ranks held bit-identical strategy states and memories, without any copy from rank 0
        assert e["world_size"] == 2 and e["identical"] and len(set(e["checksums"])) == 1
        assert len(e["memory_entries"]) == 2 and len(set(e["memory_entries"])) == 1
    distributed = json.loads((dist_dir / "metrics.json").read_text())
    assert flat(distributed["accuracy_matrix"]) == pytest.approx(flat(single["accuracy_matrix"]), abs=0.05)
    # the same training up to float summation order, which Adam amplifies where gradients are ~0
    # (tests/strategies/test_learning_contract.py compares every strategy at 1e-4, with SGD)
    assert not state_differences(strategy_state(dist_dir), strategy_state(tmp_path / "single"), 1e-2, 1e-6)
    plateaus = [(e["experience"], e["epochs"], e.get("windows")) for e in events(dist_dir) if e["kind"] == "plateau"]
    assert plateaus == [(e["experience"], e["epochs"], e.get("windows"))
                        for e in events(tmp_path / "single") if e["kind"] == "plateau"]  # ended where one process did
    if strategy == "sema":
        kinds = [e["kind"] for e in events(dist_dir)]
        assert kinds.count("expansion") == [e["kind"] for e in events(tmp_path / "single")].count("expansion")


def test_sigterm_on_one_rank_stops_both_at_the_same_step_and_resumes(tmp_path):
    path, cfg = write_config(tmp_path, "dist", "finetune_sigterm", imports=[str(PLUGIN)])
    proc = cl_run(str(path), "--nproc", "2", "--no-report", CL_TEST_SIGTERM="1")
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "rank 1: stopped by SIGTERM after step 1 of epoch 0 of experience 1" in out, out[-3000:]
    assert "stopped by a signal on another rank after step 1 of epoch 0 of experience 1" in out, out[-3000:]
    run_dir = Path(cfg["out"])
    assert f"continue with cl run --resume {run_dir} --import {PLUGIN}" in out  # resuming imports what is named
    assert load_checkpoint(run_dir / "checkpoints")["experiences_done"] == [0]
    proc = cl_run("--resume", str(run_dir), "--import", str(PLUGIN), "--nproc", "2", "--no-report")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ref_cfg = {**cfg, "strategy": {**cfg["strategy"], "name": "finetune"}, "out": str(tmp_path / "ref"), "imports": []}
    ref = run(build_config(ref_cfg))
    resumed = json.loads((run_dir / "metrics.json").read_text())
    assert flat(resumed["accuracy_matrix"]) == pytest.approx(flat(ref["accuracy_matrix"]), abs=0.05)


class SignalAt(Callback):
    """Sends ``signum`` to this process after the ``at``-th training step (counted from 1) of experience ``exp_id``,
    ``times`` times."""

    def __init__(self, exp_id: int, at: int, signum: int = signal.SIGTERM, times: int = 1) -> None:
        self.exp_id, self.at, self.signum, self.times = exp_id, at, signum, times
        self.current, self.steps = -1, 0

    def before_experience(self, agent, exp) -> None:
        self.current, self.steps = exp.id, 0

    def after_iteration(self, agent, iteration, loss) -> None:
        self.steps += self.current == self.exp_id
        if self.current == self.exp_id and self.steps == self.at:
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)


def journal(run_dir: Path) -> list[tuple]:
    """(experience, kind, epoch, loss) of each event, without times and sync checks."""
    return [(e["experience"], e["kind"], e.get("epoch"), e.get("loss")) for e in events(run_dir)]


# (strategy, params, step of experience 1 after which SIGTERM arrives, where the message says it stopped)
MID_EXPERIENCE = [
    ("finetune", {"epochs": 3}, 2, "after step 0 of epoch 1 of experience 1"),
    ("replay", {"epochs": 2, "budget": 12}, 1, "after step 0 of epoch 0 of experience 1"),
    # SEMA trains layer by layer (3 loops of 2 epochs): stop in the second loop, so the first is fast-forwarded
    ("sema", {"epochs": 2}, 3, "after step 0 of epoch 0 of experience 1"),
    # the same on the CNN (whose prefix kernels rounded a row differently at another place of its chunk on an
    # earlier CPU; cl.cache.FillingStates checks it): the states a
    # first pass computes where it reads them must come out the same in the resumed run (the fast-forwarded loops'
    # reads are replayed), and in the second epoch of a loop (the first epoch's reads too); the shift scan reads 8
    # rows, so the training loops' reads compute the rest
    ("sema-cnn", {"epochs": 2, "batch_size": 16, "scan_samples": 8}, 8, "after step 1 of epoch 0 of experience 1"),
    ("sema-cnn", {"epochs": 2, "batch_size": 16, "scan_samples": 8}, 10, "after step 0 of epoch 1 of experience 1"),
    # every loss is below 100, so the first window of 2 steps ends each loop: the resumed loop must count the step
    # it ran before the signal into that window (a fresh window would run one step more)
    ("finetune-windows", {"epochs": 3, "plateau_delta": 100.0, "plateau_every": 2}, 1,
     "after step 0 of epoch 0 of experience 1"),
]


@pytest.mark.parametrize("strategy,params,at,where", MID_EXPERIENCE,
                         ids=[f"{m[0]}-{m[2]}" if m[0] == "sema-cnn" else m[0] for m in MID_EXPERIENCE])
def test_sigterm_mid_experience_resumes_from_that_step_identically(tmp_path, strategy, params, at, where):
    strategy, _, variant = strategy.partition("-")
    cnn = {"backbone": {"name": "efficientnet_lite0", **TINY["efficientnet_lite0"]}, "eval": {"batch_size": 8}}
    ref = run({**tiny_config(tmp_path / "ref", strategy, **params), **(cnn if variant == "cnn" else {})})
    cfg = {**tiny_config(tmp_path, strategy, **params), **(cnn if variant == "cnn" else {})}
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RunInterrupted, match=f"stopped by SIGTERM {where}"):
        run(cfg, extra_callbacks=[SignalAt(1, at)])
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored
    run_dir = tmp_path / "run"
    assert load_checkpoint(run_dir / "checkpoints")["experiences_done"] == [0]
    point = load_checkpoint(run_dir / "checkpoints", PARTIAL)
    assert point["experiences_done"] == [0] and point["resume_point"]["experience"] == 1
    resumed = run(build_config(cfg), resume=True)
    assert resumed["accuracy_matrix"] == ref["accuracy_matrix"]
    assert not has_checkpoint(run_dir / "checkpoints", PARTIAL)
    a, b = strategy_state(run_dir), strategy_state(tmp_path / "ref" / "run")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical, not just close
    assert journal(run_dir) == journal(tmp_path / "ref" / "run")


def test_stop_before_training_keeps_the_experience_checkpoint(tmp_path):
    """A stop outside a training loop (here: before experience 1 starts) resumes from the last experience."""
    ref = run(tiny_config(tmp_path / "ref", "simplecil"))
    cfg = tiny_config(tmp_path, "simplecil")

    class StopRequest(Callback):
        def before_experience(self, agent, exp) -> None:
            if exp.id == 1:
                agent.ctx.stop.requested = "SIGTERM"

    with pytest.raises(RunInterrupted, match="stopped by SIGTERM before evaluating experience"):
        run(cfg, extra_callbacks=[StopRequest()])
    assert not has_checkpoint(tmp_path / "run" / "checkpoints", PARTIAL)
    assert run(build_config(cfg), resume=True)["accuracy_matrix"] == ref["accuracy_matrix"]


def test_a_second_signal_stops_at_once(tmp_path):
    with pytest.raises(KeyboardInterrupt) as info:
        run(tiny_config(tmp_path, "finetune", epochs=2), extra_callbacks=[SignalAt(0, 1, signal.SIGINT, times=2)])
    assert not isinstance(info.value, RunInterrupted)
    assert "second SIGINT" in str(info.value)


@pytest.mark.parametrize("n,world", [(0, 2), (1, 2), (5, 2), (64, 3), (7, 7), (3, 4)])
def test_local_rows_partition_the_batch(n, world):
    parts = [local_rows(n, r, world) for r in range(world)]
    assert [i for p in parts for i in range(p.start, p.stop)] == list(range(n))
    sizes = [p.stop - p.start for p in parts]
    assert max(sizes) - min(sizes) <= 1


BATCH = 7  # split 4 + 3 over two ranks: unequal slices test the weighting


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 4, generator=g), torch.randint(0, 3, (BATCH,), generator=g)


def _rank_worker(rank: int, world: int, init_file: str, out: str) -> None:
    """One rank: a step's gradients on its slice averaged over ranks, and the other collectives' answers."""
    with gloo_group(rank, world, init_file):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        x, y = batch()
        rows = local_rows(BATCH)
        torch.nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
        dist.average_gradients(list(model.parameters()), (rows.stop - rows.start) / BATCH)
        answers = {
            "grads": [p.grad for p in model.parameters()],
            "broadcast": dist.broadcast(f"rank {rank}"), "any": dist.any_rank(rank == 1),
            "sum": dist.all_sum([rank, 1]), "rows": dist.gather_rows(torch.arange(rows.start, rows.stop)),
        }
        torch.save(answers, f"{out}/rank{rank}.pt")


def test_gradient_averaging_over_unequal_slices_equals_the_whole_batch(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x, y = batch()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        for g, p in zip(got["grads"], model.parameters(), strict=True):
            assert torch.allclose(g, p.grad, atol=1e-7), (r, g, p.grad)
        assert got["broadcast"] == "rank 0" and got["any"] is True and got["sum"] == [1.0, 2.0]
        assert torch.equal(got["rows"], torch.arange(BATCH))
