"""``run``: one continual-learning run from a config, with its run directory and resume.

Run directory contract (docs/run-directory.md): ``config.yaml`` (fully resolved), ``metrics.json``,
``events.jsonl``, ``memory/`` (the agent's experience memory; the config's ``memory.path``), ``checkpoints/``.
``run(cfg, resume=True)`` continues from the last finished experience and ends with the same metrics as an
uninterrupted run. The directory is claimed, marked and locked by ``cl.rundir`` (no run deletes what it did not
create); the run is built before anything in it is written, so a config that cannot run leaves it as it was
(docs/run-directory.md).
"""

from __future__ import annotations

import shlex
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape

from cl import distributed as dist
from cl.agent import Agent
from cl.backbones import import_libraries
from cl.callbacks.base import Callback
from cl.callbacks.events import EventLog
from cl.callbacks.logger import RunLogger
from cl.checkpoint import (
    PARTIAL,
    Checkpointer,
    has_checkpoint,
    load_checkpoint,
    newest_checkpoint,
    remove_checkpoints,
    save_checkpoint,
)
from cl.config import RunConfig, build_config, dump_yaml, read_yaml, resolve, to_dict
from cl.errors import CLError, ConfigError
from cl.interrupt import GracefulStop, RunInterrupted
from cl.memory.persist import write_atomic
from cl.metrics import MetricsCallback
from cl.plugins import plugin_key
from cl.registry import LOGGERS, SCENARIOS
from cl.rundir import KEPT, MARKER, Claim, claim, clear, write_marker

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


def same_config(on_disk: RunConfig, cfg: RunConfig) -> bool:
    """Whether ``cfg`` describes the run already in a directory; the loggers may differ, and so may the order of
    keys (compared as data, not text)."""
    return to_dict(on_disk.model_copy(update={"loggers": cfg.loggers})) == to_dict(cfg)


@dataclass(frozen=True)
class Plan:
    """What a run does with its (claimed and locked) directory; shared with every rank."""

    out: Path
    resuming: bool  # continue from the checkpoint in ``out``
    fresh: bool  # this run writes ``config.yaml`` (once it is built)
    replace: bool  # --overwrite of an existing run: cleared only once the new run is built


def prepare_run_dir(cfg: RunConfig, out: Path, resume: bool, overwrite: bool) -> Plan:
    """Decide, in the locked run directory ``out``, whether this run resumes, starts afresh or replaces a run.

    Reads only: nothing is written or deleted here, so a refusal leaves the directory as it was."""
    cfg_file = out / "config.yaml"
    if overwrite:
        return Plan(out, resuming=False, fresh=True, replace=any(p.name not in KEPT for p in out.iterdir()))
    if cfg_file.exists():
        if not same_config(build_config(read_yaml(cfg_file)), cfg) and not resume:
            raise ConfigError(
                f"{out} already holds a run with a different config; pass --resume {out} to continue it, "
                "--overwrite to replace it, or --out for a new directory"
            )
        resume = True  # same config: continue (or just report) the run
    return Plan(out, resuming=resume and has_checkpoint(out / "checkpoints"), fresh=not cfg_file.exists(),
                replace=False)


def begin(cfg: RunConfig, plan: Plan) -> None:
    """Write the run directory's starting state, once the run is built: clear the run it replaces (under the
    lock), drop a stale memory, write ``config.yaml`` and, in a run from before the marker, the marker."""
    out = plan.out
    if plan.replace:
        clear(out)
    elif not plan.resuming:  # a memory saved before the first checkpoint of an interrupted run is stale
        shutil.rmtree(out / cfg.memory.path, ignore_errors=True)
    if plan.fresh:
        write_atomic(out / "config.yaml", dump_yaml(cfg).encode())  # a killed run never leaves half a config
    if not (out / MARKER).exists():
        write_marker(out)


def run(
    cfg: RunConfig | dict[str, Any],
    resume: bool = False,
    overwrite: bool = False,
    extra_callbacks: list[Callback] | None = None,
    console: Console | None = None,
    report: bool = False,
) -> dict[str, Any]:
    """Run a config end to end; returns the metrics written to ``metrics.json``.

    ``cfg.out`` must be new, empty or a run directory (else ConfigError, nothing touched); a run directory in use
    by another process is refused. ``overwrite=True`` replaces the run there, once the new run is built.

    ``report=True`` also writes the HTML dashboard ``RUN/report.html`` at the end, refreshed during
    long runs (the ``report`` logger). Under ``torchrun`` (``WORLD_SIZE`` > 1) this process is one rank of a
    data-parallel run (``cl.distributed``); rank 0 writes the run directory. SIGINT/SIGTERM stop the run after
    the current training step with its last checkpoint intact (``RunInterrupted``, resumable with ``--resume``).
    """
    if resume and overwrite:
        raise ConfigError("--resume continues a run and --overwrite replaces it: give one of them")
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
    held: list[Claim] = []  # rank 0: the claimed, locked run directory

    def prepare() -> Plan:
        c = claim(Path(cfg.out))
        try:
            plan = prepare_run_dir(cfg, c.out, resume, overwrite)
        except BaseException:
            c.abandon()
            raise
        held.append(c)
        return plan

    try:
        plan = _on_rank0(prepare)
        try:
            with GracefulStop() as stop:
                metrics = _run_stream(cfg, plan, held[0] if held else None, device, extra_callbacks, console, report,
                                      stop)
        finally:
            for c in held:
                c.release()
    except RunInterrupted as e:
        where = f"rank {rank}: " if dist.is_distributed() else ""
        saved = "the run is checkpointed at that step" if e.partial is not None else \
            "the last finished experience is checkpointed"
        named = "".join(f" --import {shlex.quote(s)}" for s in cfg.imports)  # resuming imports only what is named
        resume_cmd = f"cl run --resume {shlex.quote(str(cfg.out))}{named}"
        Console(stderr=True).print(escape(f"{where}{e}; {saved}: continue with {resume_cmd}"), highlight=False,
                                   soft_wrap=True)
        raise
    finally:
        if joined:
            dist.shutdown()
    out = plan.out
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
    cfg: RunConfig, plan: Plan, held: Claim | None, device: str, extra_callbacks: list[Callback] | None,
    console: Console, report: bool, stop: GracefulStop,
) -> dict[str, Any]:
    """The run itself, in a prepared run directory (``held``: its claim, on rank 0)."""
    out, resuming = plan.out, plan.resuming
    try:
        stream, agent, metrics_cb = _build(cfg, out, device, extra_callbacks, report)
    except Exception:
        if held is not None:
            held.abandon()
        raise
    if held is not None:
        begin(cfg, plan)
    agent.ctx.stop = stop
    ckpt = out / "checkpoints"

    def save_resume_point(point: dict[str, Any]) -> None:
        save_checkpoint(ckpt, {"experiences_done": [x.id for x in agent.seen], "resume_point": point}, name=PARTIAL)

    agent.ctx.resume_interval_s = cfg.checkpoint_interval_s
    agent.ctx.on_resume_point = save_resume_point if dist.rank() == 0 else None
    done: list[int] = []
    if resuming:
        payload = load_checkpoint(ckpt, require=("strategy", "callbacks"))
        done = agent.restore(payload, stream, memory_dir=out / cfg.memory.path, source=newest_checkpoint(ckpt))
        console.print(f"resuming {escape(str(out))}: experiences {done} already done")
    if has_checkpoint(ckpt, PARTIAL):  # stopped inside an experience: continue from that step
        partial = load_checkpoint(ckpt, PARTIAL, require=("resume_point",))
        if partial["experiences_done"] == done:
            agent.strategy.loops.resume = p = partial["resume_point"]
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
    cfg: RunConfig, out: Path, device: str, extra_callbacks: list[Callback] | None, report: bool
) -> tuple[Any, Agent, MetricsCallback]:
    """The stream, the agent and its callbacks (rank 0: every file writer) of a run; nothing is written yet (the
    callbacks open their files when they first write)."""
    rank = dist.rank()
    # the scenario loads its data on a thread while this one imports the backbone's libraries (timm: seconds); the
    # data readers (zlib, numpy) let go of the GIL, so both proceed at once
    with ThreadPoolExecutor(1, thread_name_prefix="cl-scenario") as pool:
        loading = pool.submit(SCENARIOS.create, cfg.scenario.name, **cfg.scenario.params)
        import_libraries(cfg.backbone.name)
        stream = loading.result()
    metrics_cb = MetricsCallback(out / "metrics.json" if rank == 0 else None, n_experiences=len(stream))
    callbacks: list[Callback] = [metrics_cb]
    if rank == 0:  # every file of the run directory is written by rank 0
        callbacks += [
            EventLog(out / "events.jsonl"),
            *make_loggers([*cfg.loggers, *(["report"] if report else [])], out, to_dict(cfg)),
            *(extra_callbacks or []), Checkpointer(out / "checkpoints", memory_dir=out / cfg.memory.path),
        ]
    agent = Agent(
        cfg.backbone.name, cfg.strategy.name, backbone_params=cfg.backbone.params,
        strategy_params=cfg.strategy.params, callbacks=callbacks, device=device, seed=cfg.seed,
        deterministic=cfg.deterministic, task_aware=stream.task_aware, eval_batch_size=cfg.eval.batch_size,
        progress=cfg.progress and rank == 0, cache_max_gb=cfg.cache_max_gb, rank=rank, world_size=dist.world_size(),
        memory=cfg.memory,
    )
    return stream, agent, metrics_cb


def load_run_config(run_dir: str | Path, overrides: list[str] | None = None, imports: Sequence[str] = (),
                    **top: Any) -> RunConfig:
    """The config of an existing run, with only resume-safe overrides allowed (``--set`` items, or top-level
    values such as ``device=...`` and ``loggers=[...]``; None leaves a value as the run has it).

    Loading a run directory runs no code from it: a config whose ``imports:`` name plugins (imported when the run
    starts) is refused unless ``imports`` (``cl run --resume RUN --import ...``) names each of them too.
    """
    cfg_file = Path(run_dir) / "config.yaml"
    if not cfg_file.exists():
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml)")
    changes = [(item.split("=", 1)[0], f"--set {item!r}") for item in overrides or []]
    changes += [(key, f"{key}={value!r}") for key, value in top.items() if value is not None]
    for key, what in changes:
        if key not in RESUME_SAFE_KEYS:
            raise ConfigError(
                f"{what} would change the results of a resumed run; only {sorted(RESUME_SAFE_KEYS)} may change on "
                "resume"
            )
    data = read_yaml(cfg_file)
    listed = data.get("imports") or []
    if not isinstance(listed, list) or not all(isinstance(s, str) for s in listed):
        raise ConfigError(f"{cfg_file}: imports must be a list of modules or .py files, got {listed!r}")
    confirmed = {plugin_key(s) for s in imports}
    if unconfirmed := [s for s in listed if plugin_key(s) not in confirmed]:
        flags = " ".join(f"--import {shlex.quote(s)}" for s in unconfirmed)
        raise ConfigError(f"{cfg_file} imports {', '.join(unconfirmed)}: resuming would run that code, and a run "
                          f"directory runs none unless you name it. If you trust it, resume with {flags} "
                          "(Python: load_run_config(..., imports=[...]))")
    if extra := sorted(confirmed - {plugin_key(s) for s in listed}):
        raise ConfigError(f"--import {' '.join(extra)}: {cfg_file} does not import it; a resumed run imports what its "
                          "config names")
    data["out"] = str(run_dir)
    return build_config(data, overrides, **top)


__all__ = ["load_run_config", "run", "to_dict"]
