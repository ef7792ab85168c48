"""``run``: one continual-learning run from a config, with its run directory and resume.

Run directory contract (DESIGN.md): ``config.yaml`` (fully resolved), ``metrics.json``,
``events.jsonl``, ``memory/`` (the agent's experience memory), ``checkpoints/``. ``run(cfg, resume=True)``
continues from the last finished experience and ends with the same metrics as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import fcntl
import shlex
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape

from cl import distributed as dist
from cl.agent import Agent
from cl.callbacks.base import Callback
from cl.callbacks.events import EventLog
from cl.callbacks.logger import RunLogger
from cl.checkpoint import PARTIAL, Checkpointer, has_checkpoint, load_checkpoint, remove_checkpoints, save_checkpoint
from cl.config import RunConfig, build_config, dump_yaml, read_yaml, resolve, to_dict
from cl.errors import CLError, ConfigError
from cl.interrupt import GracefulStop, RunInterrupted
from cl.memory.persist import write_atomic
from cl.metrics import MetricsCallback
from cl.registry import LOGGERS, SCENARIOS

RESUME_SAFE_KEYS = {"device", "threads", "progress", "cache_max_gb", "loggers", "eval.batch_size",
                    "checkpoint_interval_s"}


def default_out(cfg: RunConfig) -> str:
    return f"runs/{cfg.scenario.name}-{cfg.strategy.name}-{cfg.backbone.name}-seed{cfg.seed}"


def make_loggers(names: list[str], run_dir: Path | None = None, config: dict[str, Any] | None = None) -> list[Callback]:
    """Logger callbacks by name (``console``, ``csv``, ``tensorboard``, ``wandb``, ``report``).

    Loggers that write files (``RunLogger``) get the run directory and the resolved config.
    """
    loggers: list[Callback] = []
    for name in dict.fromkeys(names):  # a name given twice logs once
        cls = LOGGERS.get(name)
        is_run_logger = isinstance(cls, type) and issubclass(cls, RunLogger)
        loggers.append(cls(run_dir=run_dir, config=config) if is_run_logger else cls())
    return loggers


class RunLock:
    """An exclusive lock on a run directory, so two processes never write the same run."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / ".lock"
        self._f = None

    def __enter__(self) -> RunLock:
        self._f = open(self.path, "w")
        try:
            fcntl.flock(self._f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"{self.path.parent} is in use by another clagent process") from None
        return self

    def __exit__(self, *exc: Any) -> None:
        fcntl.flock(self._f, fcntl.LOCK_UN)
        self._f.close()


def same_config(on_disk: RunConfig, cfg: RunConfig) -> bool:
    """Whether ``cfg`` describes the run already in a directory; the loggers may differ, and so may the order of
    keys (compared as data, not text)."""
    return to_dict(on_disk.model_copy(update={"loggers": cfg.loggers})) == to_dict(cfg)


def prepare_run_dir(cfg: RunConfig, resume: bool, overwrite: bool) -> tuple[RunConfig, Path, bool, bool]:
    """Decide the run directory and whether this run resumes; write ``config.yaml``. Returns ``(cfg, out,
    resuming, fresh)``; ``fresh``: this call wrote ``config.yaml`` (``abandon`` undoes it if the run cannot start)."""
    out = Path(cfg.out or default_out(cfg))
    cfg_file = out / "config.yaml"
    if overwrite and out.exists():
        shutil.rmtree(out)
    if cfg_file.exists():
        if not same_config(build_config(read_yaml(cfg_file)), cfg) and not resume:
            raise ConfigError(
                f"{out} already holds a run with a different config; pass --resume {out} to continue it, "
                "--overwrite to replace it, or --out for a new directory"
            )
        resume = True  # same config: continue (or just report) the run
    fresh = not cfg_file.exists()
    if fresh:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(cfg_file, dump_yaml(cfg).encode())  # a killed run never leaves half a config
    return cfg, out, resume and has_checkpoint(out / "checkpoints"), fresh


def abandon(out: Path) -> None:
    """Undo ``prepare_run_dir`` for a run that failed before its first experience (bad scenario or strategy
    settings): remove what it wrote, so the corrected config can use the directory."""
    for name in ("config.yaml", "events.jsonl", ".lock"):
        (out / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        out.rmdir()  # only when nothing else is in it


def run(
    cfg: RunConfig | dict[str, Any],
    resume: bool = False,
    overwrite: bool = False,
    extra_callbacks: list[Callback] | None = None,
    console: Console | None = None,
    report: bool = False,
) -> dict[str, Any]:
    """Run a config end to end; returns the metrics written to ``metrics.json``.

    ``report=True`` also writes the HTML dashboard ``RUN/report.html`` at the end, refreshed during
    long runs (the ``report`` logger). Under ``torchrun`` (``WORLD_SIZE`` > 1) this process is one rank of a
    data-parallel run (``cl.distributed``); rank 0 writes the run directory. SIGINT/SIGTERM stop the run after
    the current training step with its last checkpoint intact (``RunInterrupted``, resumable with ``--resume``).
    """
    cfg = resolve(cfg if isinstance(cfg, RunConfig) else build_config(cfg))
    for name in cfg.loggers:  # unknown logger names fail before the run directory is touched
        LOGGERS.get(name)
    if cfg.out is None:
        cfg.out = default_out(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    joined = not dist.is_distributed()
    rank, _, device = dist.init_from_env(cfg.device)
    joined = joined and dist.is_distributed()  # this call joined the group: it leaves it at the end
    console = console or Console(quiet=rank > 0)
    try:
        cfg, out, resuming, fresh = _on_rank0(lambda: prepare_run_dir(cfg, resume, overwrite))
        with RunLock(out) if rank == 0 else contextlib.nullcontext(), GracefulStop() as stop:
            metrics = _run_stream(cfg, out, resuming, fresh, device, extra_callbacks, console, report, stop)
    except RunInterrupted as e:
        where = f"rank {rank}: " if dist.is_distributed() else ""
        saved = "the run is checkpointed at that step" if e.partial is not None else \
            "the last finished experience is checkpointed"
        resume_cmd = f"cl run --resume {shlex.quote(str(cfg.out))}"
        Console(stderr=True).print(escape(f"{where}{e}; {saved}: continue with {resume_cmd}"), highlight=False,
                                   soft_wrap=True)
        raise
    finally:
        if joined:
            dist.shutdown()
    console.print(f"run directory: {escape(str(out))}")
    if (out / "report.html").exists() and (report or "report" in cfg.loggers):
        console.print(f"report: {escape(str(out / 'report.html'))}")
    return metrics


def _on_rank0(fn: Callable[[], Any]) -> Any:
    """``fn()`` run on rank 0 only; its result (or its error, raised on every rank) is shared with all ranks."""
    result, error = None, None
    if dist.rank() == 0:
        try:
            result = fn()
        except CLError as e:
            error = e
    result, error = dist.broadcast((result, error))
    if error is not None:
        raise error
    return result


def _run_stream(
    cfg: RunConfig, out: Path, resuming: bool, fresh: bool, device: str, extra_callbacks: list[Callback] | None,
    console: Console, report: bool, stop: GracefulStop,
) -> dict[str, Any]:
    """The run itself, in a prepared (and, on rank 0, locked) run directory."""
    try:
        stream, agent, metrics_cb = _build(cfg, out, resuming, device, extra_callbacks, report)
    except Exception:
        if fresh and dist.rank() == 0:
            abandon(out)
        raise
    agent.ctx.stop = stop
    ckpt = out / "checkpoints"

    def save_resume_point(point: dict[str, Any]) -> None:
        save_checkpoint(ckpt, {"experiences_done": [x.id for x in agent.seen], "resume_point": point}, name=PARTIAL)

    agent.ctx.resume_interval_s = cfg.checkpoint_interval_s
    agent.ctx.on_resume_point = save_resume_point if dist.rank() == 0 else None
    done: list[int] = []
    if resuming:
        done = agent.restore(load_checkpoint(ckpt), stream, memory_dir=out / "memory")
        console.print(f"resuming {escape(str(out))}: experiences {done} already done")
    if has_checkpoint(ckpt, PARTIAL):  # stopped inside an experience: continue from that step
        partial = load_checkpoint(ckpt, PARTIAL)
        if partial["experiences_done"] == done:
            agent.strategy.resume_fit = p = partial["resume_point"]
            console.print(f"continuing experience {p['experience']} from step {p['step']} of epoch {p['epoch']}")
    try:
        agent.callbacks.before_run(agent, stream)
        for i, exp in enumerate(stream):
            if exp.id in done:
                continue
            future = stream.experiences[i + 1 :] if cfg.eval.future else ()
            agent.learn(exp, future=future)
            if dist.rank() == 0:
                remove_checkpoints(ckpt, PARTIAL)  # the experience's own checkpoint supersedes its resume point
        agent.callbacks.after_run(agent)
    except RunInterrupted as e:
        for cb in agent.callbacks.callbacks:  # flush what the loggers hold; the checkpoint is already on disk
            if hasattr(cb, "close"):
                cb.close()
        if e.partial is not None and dist.rank() == 0:
            save_resume_point(e.partial)
        raise
    return metrics_cb.metrics(agent)


def _build(
    cfg: RunConfig, out: Path, resuming: bool, device: str, extra_callbacks: list[Callback] | None, report: bool
) -> tuple[Any, Agent, MetricsCallback]:
    """The stream, the agent and its callbacks (rank 0: every file writer) of a run."""
    rank = dist.rank()
    stream = SCENARIOS.create(cfg.scenario.name, **cfg.scenario.params)
    metrics_cb = MetricsCallback(out / "metrics.json" if rank == 0 else None, n_experiences=len(stream))
    callbacks: list[Callback] = [metrics_cb]
    if rank == 0:  # every file of the run directory is written by rank 0
        callbacks += [
            EventLog(out / "events.jsonl"),
            *make_loggers([*cfg.loggers, *(["report"] if report else [])], out, to_dict(cfg)),
            *(extra_callbacks or []), Checkpointer(out / "checkpoints", memory_dir=out / "memory"),
        ]
        if not resuming:  # a memory saved before the first checkpoint of an interrupted run is stale
            shutil.rmtree(out / "memory", ignore_errors=True)
    agent = Agent(
        cfg.backbone.name, cfg.strategy.name, backbone_params=cfg.backbone.params,
        strategy_params=cfg.strategy.params, callbacks=callbacks, device=device, seed=cfg.seed,
        deterministic=cfg.deterministic, task_aware=stream.task_aware, eval_batch_size=cfg.eval.batch_size,
        progress=cfg.progress and rank == 0, cache_max_gb=cfg.cache_max_gb, rank=rank, world_size=dist.world_size(),
    )
    return stream, agent, metrics_cb


def load_run_config(run_dir: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """The config of an existing run, with only resume-safe overrides allowed."""
    cfg_file = Path(run_dir) / "config.yaml"
    if not cfg_file.exists():
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml)")
    for item in overrides or []:
        if item.split("=", 1)[0] not in RESUME_SAFE_KEYS:
            raise ConfigError(
                f"--set {item!r} would change the results of a resumed run; "
                f"only {sorted(RESUME_SAFE_KEYS)} may change on resume"
            )
    data = read_yaml(cfg_file)
    data["out"] = str(run_dir)
    return build_config(data, overrides)


__all__ = ["load_run_config", "run", "to_dict"]
