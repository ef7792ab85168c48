"""Run directories: what makes a folder a clagent run, which process may write it, and what a run may delete.

A run directory carries the marker ``.clagent-run`` (a small JSON file), written first when a run creates the
directory or finds it empty. clagent writes into, replaces and cleans up only such directories, or ones made by
clagent before the marker existed (a ``config.yaml`` that reads as a run config next to a committed checkpoint),
which get the marker when a run uses them. A folder that is neither, and not empty, is refused with its files
untouched. ``RunLock`` makes one process at a time the owner of a run directory: the lock is taken before the
directory is read or changed, and ``--overwrite`` clears the old run only under it (``cl.run`` does so only once
the new run is built, so a bad config never destroys the old run).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cl.errors import CLError, ConfigError

MARKER = ".clagent-run"
LOCK = ".lock"
KEPT = frozenset({MARKER, LOCK})  # what replacing a run keeps: the directory's identity and the lock its owner holds


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` is a clagent run directory: it holds the marker, or it is a run from before the marker."""
    return (path / MARKER).is_file() or is_unmarked_run(path)


def is_unmarked_run(path: Path) -> bool:
    """A run made by a clagent that wrote no marker: a ``config.yaml`` that reads as a run config and a committed
    checkpoint (``checkpoints/ckpt-N`` or ``partial-N``) beside it."""
    from cl.checkpoint import PARTIAL, has_checkpoint
    from cl.config import build_config, read_yaml

    ckpt = path / "checkpoints"
    if not (path / "config.yaml").is_file() or not (has_checkpoint(ckpt) or has_checkpoint(ckpt, PARTIAL)):
        return False
    try:
        build_config(read_yaml(path / "config.yaml"))
    except CLError:
        return False
    return True


def write_marker(path: Path) -> bool:
    """Create ``path/.clagent-run``; False when it exists already (another process marked the directory first)."""
    try:
        with open(path / MARKER, "x", encoding="utf-8") as f:
            json.dump({"clagent_run": 1, "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")},
                      f)
    except FileExistsError:
        return False
    return True


class RunLock:
    """An exclusive lock on a run directory (``flock`` on ``RUN/.lock``), so two processes never write the same run.

    A second process is refused at once (ConfigError), never kept waiting. The file stays after release: removing
    it could let two processes lock two different files of the same name."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK
        self._fd: int | None = None
        self.created = False  # this lock made RUN/.lock

    def acquire(self) -> RunLock:
        self.created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            self.created = False
            raise ConfigError(
                f"{self.path.parent} is in use by another clagent process (it holds {self.path}); wait for it to "
                "finish, or pass --out for another directory"
            ) from None
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _make_dirs(path: Path) -> list[Path]:
    """Create ``path`` and its missing parents; the directories this call made, outermost first. On failure
    (permissions, a file in the way, a read-only or virtual filesystem) nothing is left and ConfigError says why."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    made: list[Path] = []
    try:
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:
                if not d.is_dir():
                    raise
                continue  # another process made it: not ours to remove
            made.append(d)
    except OSError as e:
        _remove_dirs(made)
        where = f" ({e.filename})" if e.filename and Path(e.filename) != path else ""
        raise ConfigError(f"cannot create the run directory {path}: {e.strerror or e}{where}; "
                          "pass --out a directory you can write") from None
    return made


def _remove_dirs(made: list[Path]) -> None:
    for d in reversed(made):
        with contextlib.suppress(OSError):
            d.rmdir()  # only when empty: never what someone else put there


@dataclass
class Claim:
    """A run directory held by this process: its lock, and what claiming it created (undone by ``abandon``)."""

    out: Path
    lock: RunLock
    made: list[Path] = field(default_factory=list)  # directories created by the claim, outermost first
    marked: bool = False  # the claim wrote the marker: the directory was new or empty
    new: bool = False  # the directory held nothing but the marker and the lock: everything else in it is this run's

    def release(self) -> None:
        self.lock.release()

    def abandon(self) -> None:
        """Undo the claim of a run that could not start (refused, or failed while it was built): release the lock
        and, where the directory held nothing of another run, remove what this run put there, the marker, the lock
        file and the directories the claim made. A directory that holds another run keeps it."""
        if self.new:
            clear(self.out)
        if self.marked:
            (self.out / MARKER).unlink(missing_ok=True)
        self.lock.release()
        if self.marked and self.lock.created:
            self.lock.path.unlink(missing_ok=True)
        _remove_dirs(self.made)


def claim(out: Path) -> Claim:
    """Take ``out`` for a run: create it (and mark it) when missing or empty, refuse a file or a folder that is not a
    run, then lock it. Nothing is deleted; a refusal changes nothing."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file, not a run directory: pass --out a new directory, an empty one, or a run")
    try:
        entries = {p.name for p in out.iterdir()} if out.is_dir() else set()
    except OSError as e:
        raise ConfigError(f"cannot read the run directory {out}: {e.strerror or e}") from None
    if entries - KEPT and not is_run_dir(out):
        raise ConfigError(
            f"{out} is a folder that is not a clagent run (no {MARKER} marker) and not empty: clagent never writes "
            "into or deletes such a folder; pass --out a new or empty directory"
        )
    made = _make_dirs(out) if not out.exists() else []
    c = Claim(out, RunLock(out), made=made)
    try:
        if not (out / MARKER).exists():
            c.marked = not entries - KEPT and write_marker(out)
        c.lock.acquire()
        c.new = not ({p.name for p in out.iterdir()} - KEPT)
    except BaseException:
        if c.marked:
            (out / MARKER).unlink(missing_ok=True)
        _remove_dirs(made)
        raise
    return c


def clear(out: Path) -> None:
    """Remove everything in the run directory ``out`` but its marker and lock (``--overwrite``, under the lock)."""
    for p in out.iterdir():
        if p.name in KEPT:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


__all__ = ["KEPT", "LOCK", "MARKER", "Claim", "RunLock", "claim", "clear", "is_run_dir", "write_marker"]
