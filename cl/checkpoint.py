"""Atomic, checksummed checkpoints and the callback that writes one after every experience.

Layout of a checkpoint directory (``RUN/checkpoints``)::

    ckpt-000003.pt     the payload: strategy state, callback state, experiences done (``torch.save``)
    ckpt-000003.json   its manifest: format version, sha256 and size of the .pt, experiences done, memory
    ckpt-000002.pt     the previous checkpoint and its manifest, kept as a fallback
    ckpt-000002.json

A save writes ``ckpt-N.pt`` (temporary file, fsync, rename), then its manifest the same way: renaming the
manifest commits the checkpoint, so one exists only once both files are complete. Only then are older
checkpoints deleted (the newest ``KEEP_CHECKPOINTS`` stay); leftovers of a killed save (``*.tmp``, a ``.pt``
without its manifest) are removed by the next save, and a save that fails (a full disk) removes what it wrote
and says which checkpoint was kept. ``load_checkpoint`` reads the newest; if it is truncated, foreign or of
another format version, the error names the last good one, the experiences it holds, and which files to
delete to resume from it (no silent fallback: a bad newest file means something outside clagent broke it).

The agent's experience memory (``cl.memory.persist``) is saved just before the checkpoint, which records the
generation it goes with. ``Checkpointer`` pins the generations its kept checkpoints name (the memory's
``KEEP`` file) before saving, and prunes the others once the new checkpoint is committed. A crash between
the two saves leaves the memory a generation ahead of the checkpoint; ``load_memory`` reads the generation
the checkpoint names, so resuming always works (and loading never writes).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any

import torch

from cl.callbacks.base import Callback
from cl.errors import CheckpointError
from cl.memory import ExperienceMemory
from cl.memory.persist import live_generation, prune, read_generation, retain, write_atomic

FORMAT_VERSION = 1
KEEP_CHECKPOINTS = 2
PARTIAL = "partial"  # resume points inside an experience (a run stopped by SIGINT/SIGTERM mid-training)
_LEGACY = {"ckpt": "last"}  # before numbered files a directory held one unnumbered ``last.pt`` + ``last.json``


def is_disk_full(e: BaseException) -> bool:
    """Whether ``e`` (from a write: OSError, SQLite's or FAISS's error) means the disk or quota is full."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(s in str(e) for s in ("disk is full", "No space left"))  # SQLite's and FAISS's wording


def _committed(directory: Path, name: str) -> list[tuple[int, Path]]:
    """(number, manifest) of the committed checkpoints, newest first; a legacy unnumbered one is number 0."""
    if not directory.is_dir():
        return []
    pattern = re.compile(rf"^{re.escape(name)}-(\d{{6,}})\.json$")
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := pattern.match(p.name))]
    legacy = directory / f"{_LEGACY.get(name, name)}.json"
    if legacy.is_file():
        found.append((0, legacy))
    return sorted(found, reverse=True)


def _manifests(directory: Path, name: str) -> list[Path]:
    return [man for _, man in _committed(directory, name)]


def _manifest(man: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(man.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint manifest {man} is unreadable ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise CheckpointError(f"checkpoint {man.stem} in {man.parent} has format {version!r}, this clagent "
                              f"reads {FORMAT_VERSION} (a foreign file or another clagent version)")
    return manifest


def _load(man: Path, map_location: str) -> dict[str, Any]:
    """The verified payload a manifest commits; CheckpointError saying what is wrong."""
    manifest = _manifest(man)
    pt = man.with_suffix(".pt")
    try:
        data = pt.read_bytes()
    except OSError as e:
        raise CheckpointError(f"checkpoint {pt} is unreadable ({e.strerror or e})") from None
    if hashlib.sha256(data).hexdigest() != manifest.get("sha256"):
        raise CheckpointError(f"checkpoint {pt} does not match its checksum in {man.name} (truncated or "
                              f"replaced; {len(data)} bytes, its manifest says {manifest.get('bytes')})")
    try:
        payload = torch.load(io.BytesIO(data), map_location=map_location, weights_only=False)
    except Exception as e:
        raise CheckpointError(f"checkpoint {pt} is not a clagent checkpoint (it cannot be unpickled: "
                              f"{type(e).__name__}: {e})") from None
    if not isinstance(payload, dict) or "experiences_done" not in payload:
        raise CheckpointError(f"checkpoint {pt} is not a clagent checkpoint (it holds no experiences_done)")
    return payload


def _peek(man: Path) -> dict[str, Any]:
    """A manifest's content without checks; {} when unreadable."""
    try:
        manifest = json.loads(man.read_text())
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def _memory_generation(manifest: dict[str, Any]) -> str | None:
    memory = manifest.get("memory")
    return memory.get("generation") if isinstance(memory, dict) else None


def describe(man: Path) -> str:
    """``ckpt-000003 (experiences [0, 1], memory gen-000004)``: which checkpoint a manifest commits."""
    manifest = _peek(man)
    memory = f", memory {gen}" if (gen := _memory_generation(manifest)) else ""
    return f"{man.stem} (experiences {manifest.get('experiences_done', '?')}{memory})"


def last_kept(directory: str | Path, name: str = "ckpt") -> str:
    """What a failed save left, in words: the newest committed checkpoint (with the memory it names)."""
    found = _manifests(Path(directory), name)
    return f"checkpoint {describe(found[0])} is kept" if found else "there is no earlier checkpoint"


def has_checkpoint(directory: str | Path, name: str = "ckpt") -> bool:
    """Whether ``directory`` holds a committed checkpoint (readable or not: ``load_checkpoint`` says)."""
    return bool(_manifests(Path(directory), name))


def remove_checkpoints(directory: str | Path, name: str) -> None:
    """Delete the checkpoints ``name-N`` in ``directory`` (each manifest before its payload) and leftovers of
    killed saves."""
    for man in _manifests(Path(directory), name):
        man.unlink()
        man.with_suffix(".pt").unlink(missing_ok=True)
    if Path(directory).is_dir():
        _clean_leftovers(Path(directory), name)


def memory_generations(directory: str | Path, name: str = "ckpt") -> set[str]:
    """The experience-memory generations the committed checkpoints in ``directory`` name."""
    return {gen for man in _manifests(Path(directory), name) if (gen := _memory_generation(_peek(man)))}


def _clean_leftovers(directory: Path, name: str) -> None:
    """Remove what killed saves left: temporary files and payloads whose manifest was never committed."""
    pattern = re.compile(rf"^{re.escape(name)}-\d{{6,}}\.(pt|json)(\.tmp)?$")
    for p in directory.iterdir():
        orphan = p.suffix == ".pt" and not p.with_suffix(".json").exists()
        if pattern.match(p.name) and (p.suffix == ".tmp" or orphan):
            p.unlink(missing_ok=True)


def save_checkpoint(directory: str | Path, payload: dict[str, Any], name: str = "ckpt") -> Path:
    """Commit ``payload`` (tensors and plain data) as the next ``directory/name-N.pt`` with its manifest, then
    delete all but the newest ``KEEP_CHECKPOINTS``; returns the .pt path. A full disk raises CheckpointError
    and leaves the previous checkpoint as it was."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(directory, name)
    number = max((n for n, _ in _committed(directory, name)), default=0) + 1
    buf = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, **payload}, buf)
    data = buf.getvalue()
    pt, man = directory / f"{name}-{number:06d}.pt", directory / f"{name}-{number:06d}.json"
    manifest = {
        "format_version": FORMAT_VERSION,
        "file": pt.name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "experiences_done": payload.get("experiences_done", []),
        "memory": payload.get("memory"),
    }
    try:
        write_atomic(pt, data)
        write_atomic(man, json.dumps(manifest, indent=2).encode())  # the commit
    except OSError as e:
        if not man.exists():
            pt.unlink(missing_ok=True)
        if not is_disk_full(e):
            raise
        raise CheckpointError(f"the disk is full: writing checkpoint {pt.stem} in {directory} failed ({e}); "
                              f"{last_kept(directory, name)}; free some space and resume the run") from e
    for old in _manifests(directory, name)[KEEP_CHECKPOINTS:]:
        old.unlink()  # the manifest first: a payload left alone is a leftover the next save removes
        old.with_suffix(".pt").unlink(missing_ok=True)
    return pt


def load_checkpoint(directory: str | Path, name: str = "ckpt", map_location: str = "cpu") -> dict[str, Any]:
    """Read and verify the newest checkpoint in ``directory``; raises CheckpointError saying what is wrong and,
    when the newest is unreadable, naming the last good one and how to resume from it."""
    directory = Path(directory)
    found = _manifests(directory, name)
    if not found:
        raise CheckpointError(f"no checkpoint in {directory} (expected {name}-NNNNNN.pt and {name}-NNNNNN.json)")
    problems: list[str] = []
    for man in found:
        try:
            payload = _load(man, map_location)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        if problems:
            bad = [str(p) for m in found[: len(problems)] for p in (m, m.with_suffix(".pt")) if p.exists()]
            raise CheckpointError(f"{problems[0]}. The last good checkpoint is {describe(man)}; to resume from it, "
                                  f"delete {' '.join(bad)} and resume the run again")
        return payload
    raise CheckpointError(f"{problems[0]}; no earlier checkpoint in {directory} is readable: start the run again "
                          "with --overwrite")


def save_memory(memory: ExperienceMemory, directory: str | Path) -> dict[str, Any]:
    """Save ``memory`` to ``directory`` (a new atomic generation) and return what identifies that save."""
    directory = Path(directory)
    before = memory.path
    memory.save(directory)
    memory.path = before  # saving a copy elsewhere does not move the memory
    gen, manifest = read_generation(directory, verify=False)
    return {"generation": gen.name, "entries": int(manifest["entries"])}


def load_memory(directory: str | Path, expected: dict[str, Any]) -> ExperienceMemory:
    """Load the memory generation a checkpoint recorded (``save_memory``'s return) from ``directory``, also when
    a later one is live (a run killed between saving the memory and the checkpoint)."""
    memory = ExperienceMemory.load(directory, generation=str(expected.get("generation")))
    if len(memory) != expected.get("entries"):
        raise CheckpointError(f"the experience memory in {directory} holds {len(memory)} entries, the checkpoint "
                              f"expects {expected.get('entries')}; start the run again with --overwrite")
    return memory


class Checkpointer(Callback):
    """Saves strategy and callback state after each experience (the last callback in the list), and the
    agent's experience memory to ``memory_dir`` just before."""

    def __init__(self, directory: str | Path, memory_dir: str | Path | None = None) -> None:
        self.directory = Path(directory)
        self.memory_dir = Path(memory_dir) if memory_dir is not None else None

    def after_experience(self, agent: Any, exp: Any) -> None:
        payload = agent.checkpoint_payload()
        memory_dir = self.memory_dir
        if memory_dir is None:
            save_checkpoint(self.directory, payload)
            return
        try:
            live = live_generation(memory_dir)  # a legacy checkpoint names the live generation only there
            retain(memory_dir, memory_generations(self.directory) | ({live} if live else set()))
            payload["memory"] = agent.save_memory(memory_dir)
            save_checkpoint(self.directory, payload)
            retain(memory_dir, memory_generations(self.directory))  # committed: prune what no kept checkpoint names
            prune(memory_dir)
        except CheckpointError:
            raise
        except Exception as e:
            if not is_disk_full(e):
                raise
            raise CheckpointError(f"the disk is full: saving the experience memory to {memory_dir} failed ({e}); "
                                  f"{last_kept(self.directory)}; free some space and resume the run") from e
