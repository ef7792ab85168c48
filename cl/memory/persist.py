"""Atomic, checksummed generations of a saved memory in one directory.

Layout of a memory directory::

    CURRENT              -> the name of the live generation, e.g. "gen-000003"
    gen-000003/          manifest.json (format, version, sha256 and size of every file), metadata.sqlite,
                         index-<kind>.faiss for each non-empty kind

A save writes a new ``gen-N.tmp`` next to the live generation, fsyncs every file and the folder, renames
it to ``gen-N``, then swaps ``CURRENT`` (write ``CURRENT.tmp``, fsync, ``os.replace``: atomic on POSIX and
Windows) and only then deletes older generations. A crash at any point leaves ``CURRENT`` naming a
complete generation, so the previous memory stays loadable with every entry it had; leftovers of an
interrupted save are removed by the next one. Directories are swapped through a pointer file because
no portable rename replaces a non-empty directory. One process writes a memory at a time (in a
distributed run, rank 0); a reader racing a writer may find its generation deleted and should retry.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cl.errors import CheckpointError, ConfigError

FORMAT = "clagent.experience_memory"
FORMAT_VERSION = 1
CURRENT = "CURRENT"
MANIFEST = "manifest.json"
_GEN = re.compile(r"^gen-(\d{6,})(\.tmp)?$")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    if os.name == "nt":  # Windows cannot open a directory for fsync; its renames are journaled
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    """Write a new generation with ``write_files(folder) -> file names`` and make it the live one."""
    check_writable(root)
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    if created:
        _fsync_dir(root.parent)
    numbers = [int(m.group(1)) for p in root.iterdir() if (m := _GEN.match(p.name))]
    name = f"gen-{max(numbers, default=0) + 1:06d}"
    tmp = root / f"{name}.tmp"
    tmp.mkdir()
    files = {}
    for fname in write_files(tmp):
        path = tmp / fname
        _fsync_file(path)
        files[fname] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    (tmp / MANIFEST).write_text(json.dumps({**manifest, "files": files}, indent=2) + "\n")
    _fsync_file(tmp / MANIFEST)
    _fsync_dir(tmp)
    final = root / name
    os.replace(tmp, final)
    _fsync_dir(root)
    pointer = root / f"{CURRENT}.tmp"
    with open(pointer, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer, root / CURRENT)
    _fsync_dir(root)
    for p in root.iterdir():  # older generations and leftovers of interrupted saves
        if _GEN.match(p.name) and p.name != name:
            shutil.rmtree(p, ignore_errors=True)
    return final


def read_generation(root: Path, verify: bool = True) -> tuple[Path, dict[str, Any]]:
    """The live generation's folder and manifest; raises CheckpointError saying what is wrong."""
    if not root.exists():
        raise CheckpointError(f"no experience memory at {root} (the directory does not exist)")
    if not is_memory_dir(root):
        raise CheckpointError(
            f"{root} is not an experience memory (no {CURRENT} file); create one with "
            "ExperienceMemory(dim, path=...) and save() it"
        )
    name = (root / CURRENT).read_text().strip()
    gen = root / name
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
    if verify:
        for fname, info in manifest.get("files", {}).items():
            path = gen / fname
            if not path.is_file():
                raise CheckpointError(f"experience memory {root} is corrupted: {path.name} is missing from {gen.name}")
            if path.stat().st_size != info["bytes"] or sha256_file(path) != info["sha256"]:
                raise CheckpointError(
                    f"experience memory {root} is corrupted: {gen.name}/{fname} does not match its sha256 checksum "
                    "(truncated or modified); restore the directory from a backup or rebuild the memory"
                )
    return gen, manifest
