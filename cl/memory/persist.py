"""Atomic, checksummed generations of a saved memory in one directory.

Layout of a memory directory::

    CURRENT              -> the name of the live generation, e.g. "gen-000003"
    gen-000003/          manifest.json (format, version, sha256 and size of every file), metadata.sqlite,
                         index-<kind>.faiss for each non-empty kind
    KEEP                 (optional) names of older generations that saves must not delete, one a line

A save writes a new ``gen-N.tmp`` next to the live generation, fsyncs every file and the folder, renames
it to ``gen-N``, then swaps ``CURRENT`` (write ``CURRENT.tmp``, fsync, ``os.replace``: atomic on POSIX and
Windows) and only then deletes older generations, except those ``KEEP`` names. A crash at any point leaves
``CURRENT`` naming a complete generation, so the previous memory stays loadable with every entry it had; a
save that fails (a full disk) removes what it wrote, and leftovers of a killed save are removed by the next
one. Directories are swapped through a pointer file because no portable rename replaces a non-empty
directory. One process writes a memory at a time (in a distributed run, rank 0); a reader racing a writer
may find its generation deleted and should retry.

``KEEP`` is how checkpoints (``cl.checkpoint``) pin the generations they name: ``retain`` writes it before
a save, ``prune`` deletes what is neither live nor retained once the checkpoint is committed, and a run
resuming from a checkpoint older than the live memory reads the retained generation it names
(``read_generation(root, generation=...)``), without writing anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from cl.errors import CheckpointError, ConfigError

FORMAT = "clagent.experience_memory"
FORMAT_VERSION = 3  # 2: tuned search settings (config.tune_recall, kinds.*.tuning); 3: declared kinds and fields
CURRENT = "CURRENT"
KEEP = "KEEP"
MANIFEST = "manifest.json"
_GEN = re.compile(r"^gen-(\d{6,})(\.tmp)?$")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (a no-op on Windows)."""
    if os.name == "nt":  # Windows cannot open a directory for fsync; its renames are journaled
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` all at once: a temporary file, fsynced, renamed over it; on failure (a full
    disk) the temporary file is removed and ``path`` is untouched."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def is_memory_dir(root: Path) -> bool:
    return (root / CURRENT).is_file()


def check_writable(root: Path) -> None:
    """Refuse a target that is a file, or a non-empty folder holding anything but a memory."""
    if root.exists() and not root.is_dir():
        raise ConfigError(f"memory path {root} is a file; give a directory path (it will hold the memory's files)")
    if root.is_dir() and not is_memory_dir(root):
        foreign = [p.name for p in root.iterdir() if not (_GEN.match(p.name) or p.name == f"{CURRENT}.tmp")]
        if foreign:
            shown = ", ".join(sorted(foreign)[:5])
            raise ConfigError(
                f"memory path {root} exists and is not an experience memory (it holds {shown}); "
                "choose a new or empty directory"
            )


def write_generation(root: Path, write_files: Callable[[Path], list[str]], manifest: dict[str, Any]) -> Path:
    """Write a new generation with ``write_files(folder) -> file names`` and make it the live one.

    On failure nothing of the new generation is left behind and the previous one stays live."""
    check_writable(root)
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    if created:
        fsync_dir(root.parent)
    numbers = [int(m.group(1)) for p in root.iterdir() if (m := _GEN.match(p.name))]
    name = f"gen-{max(numbers, default=0) + 1:06d}"
    tmp, final = root / f"{name}.tmp", root / name
    try:
        tmp.mkdir()
        files = {}
        for fname in write_files(tmp):
            path = tmp / fname
            _fsync_file(path)
            files[fname] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        (tmp / MANIFEST).write_text(json.dumps({**manifest, "files": files}, indent=2) + "\n")
        _fsync_file(tmp / MANIFEST)
        fsync_dir(tmp)
        os.replace(tmp, final)
        fsync_dir(root)
        write_atomic(root / CURRENT, (name + "\n").encode())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if live_generation(root) != name:
            shutil.rmtree(final, ignore_errors=True)
        raise
    prune(root)
    return final


def live_generation(root: Path) -> str | None:
    """The name ``CURRENT`` holds, or None when ``root`` holds no memory."""
    return (root / CURRENT).read_text().strip() if is_memory_dir(root) else None


def retained(root: Path) -> set[str]:
    """The generations ``KEEP`` names."""
    keep = root / KEEP
    return set(keep.read_text().split()) if keep.is_file() else set()


def retain(root: Path, names: Iterable[str]) -> None:
    """Pin ``names`` (generations): saves and ``prune`` keep them until the next ``retain``."""
    if is_memory_dir(root):
        write_atomic(root / KEEP, "".join(f"{n}\n" for n in sorted(set(names))).encode())


def prune(root: Path) -> None:
    """Delete every generation but the live one and the retained ones, and leftovers of interrupted saves."""
    keep = {live_generation(root), *retained(root)}
    for p in root.iterdir():
        if _GEN.match(p.name) and p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)


def read_generation(root: Path, verify: bool = True, generation: str | None = None) -> tuple[Path, dict[str, Any]]:
    """The live generation's folder and manifest (``generation``'s: a retained one); raises CheckpointError
    saying what is wrong."""
    if not root.exists():
        raise CheckpointError(f"no experience memory at {root} (the directory does not exist)")
    if not is_memory_dir(root):
        raise CheckpointError(
            f"{root} is not an experience memory (no {CURRENT} file); create one with "
            "ExperienceMemory(dim, path=...) and save() it"
        )
    name = generation or (root / CURRENT).read_text().strip()
    gen = root / name
    if generation and not (_GEN.match(name) and not name.endswith(".tmp") and (gen / MANIFEST).is_file()):
        held = sorted({live_generation(root), *retained(root)} - {None})
        raise CheckpointError(f"experience memory {root} has no generation {name!r} (it holds {', '.join(held)}): "
                              "it was deleted, or the checkpoint naming it belongs to another memory")
    if not _GEN.match(name) or name.endswith(".tmp") or not (gen / MANIFEST).is_file():
        raise CheckpointError(
            f"experience memory {root} is corrupted: {CURRENT} names {name!r}, which is not a saved generation "
            "(restore the directory from a backup or rebuild the memory)"
        )
    try:
        manifest = json.loads((gen / MANIFEST).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"experience memory manifest {gen / MANIFEST} is unreadable ({e}); it is corrupted"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        fmt = manifest.get("format") if isinstance(manifest, dict) else None
        raise CheckpointError(f"{root} is not an experience memory (its manifest has format {fmt!r}, "
                              f"expected {FORMAT!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"experience memory {root} has an invalid format version {version!r}; it is corrupted")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"experience memory {root} has format version {version}, written by a newer clagent; this clagent "
            f"reads versions up to {FORMAT_VERSION}: upgrade clagent to load it"
        )
    files = manifest.get("files", {})
    if not isinstance(files, dict) or not all(
        isinstance(info, dict) and type(info.get("bytes")) is int and isinstance(info.get("sha256"), str)
        and Path(fname).name == fname and fname not in ("", ".", "..") for fname, info in files.items()
    ):
        raise CheckpointError(f"experience memory manifest {gen / MANIFEST} lists its files wrongly (each must be "
                              "a file name of the generation, with its bytes and sha256); it is corrupted")
    if verify:
        for fname, info in files.items():
            path = gen / fname
            if not path.is_file():
                raise CheckpointError(f"experience memory {root} is corrupted: {path.name} is missing from {gen.name}")
            if path.stat().st_size != info["bytes"] or sha256_file(path) != info["sha256"]:
                raise CheckpointError(
                    f"experience memory {root} is corrupted: {gen.name}/{fname} does not match its sha256 checksum "
                    "(truncated or modified); restore the directory from a backup or rebuild the memory"
                )
    return gen, manifest
