"""Atomic, checksummed checkpoints and the callback that writes one after every experience.

A checkpoint is ``checkpoints/last.pt`` plus ``last.json`` (format version, sha256, experiences
done). Writes go to a temporary file, are fsynced and renamed, so a crash mid-save leaves the
previous checkpoint intact; a file whose checksum does not match is rejected.

The agent's experience memory is saved (atomically, by ``ExperienceMemory.save``) just before the
checkpoint, which records the memory generation it goes with; resuming loads exactly that generation.
A crash between the two saves leaves a memory one experience ahead of the checkpoint, which resuming
reports instead of continuing with the wrong memory.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import torch

from cl.callbacks.base import Callback
from cl.errors import CheckpointError
from cl.memory import ExperienceMemory
from cl.memory.persist import read_generation

FORMAT_VERSION = 1


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(directory: str | Path, payload: dict[str, Any], name: str = "last") -> Path:
    """Write ``payload`` (tensors and plain data) as ``directory/name.pt`` with its manifest."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, **payload}, buf)
    data = buf.getvalue()
    manifest = {
        "format_version": FORMAT_VERSION,
        "file": f"{name}.pt",
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "experiences_done": payload.get("experiences_done", []),
    }
    _atomic_write(directory / f"{name}.pt", data)
    _atomic_write(directory / f"{name}.json", json.dumps(manifest, indent=2).encode())
    return directory / f"{name}.pt"


def load_checkpoint(directory: str | Path, name: str = "last", map_location: str = "cpu") -> dict[str, Any]:
    """Read and verify ``directory/name.pt``; raises CheckpointError saying what is wrong."""
    directory = Path(directory)
    pt, man = directory / f"{name}.pt", directory / f"{name}.json"
    if not pt.exists() or not man.exists():
        raise CheckpointError(f"no checkpoint in {directory} (expected {pt.name} and {man.name})")
    try:
        manifest = json.loads(man.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint manifest {man} is unreadable: {e}") from None
    data = pt.read_bytes()
    if hashlib.sha256(data).hexdigest() != manifest.get("sha256"):
        raise CheckpointError(
            f"checkpoint {pt} does not match its checksum in {man.name} (truncated or replaced); "
            f"its manifest says it held experiences {manifest.get('experiences_done')}"
        )
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {pt} has format {manifest.get('format_version')}, this clagent reads {FORMAT_VERSION}"
        )
    return torch.load(io.BytesIO(data), map_location=map_location, weights_only=False)


def save_memory(memory: ExperienceMemory, directory: str | Path) -> dict[str, Any]:
    """Save ``memory`` to ``directory`` (a new atomic generation) and return what identifies that save."""
    directory = Path(directory)
    before = memory.path
    memory.save(directory)
    memory.path = before  # saving a copy elsewhere does not move the memory
    gen, manifest = read_generation(directory, verify=False)
    return {"generation": gen.name, "entries": int(manifest["entries"])}


def load_memory(directory: str | Path, expected: dict[str, Any]) -> ExperienceMemory:
    """Load the memory generation a checkpoint recorded (``save_memory``'s return) from ``directory``."""
    directory = Path(directory)
    gen, _ = read_generation(directory, verify=False)
    if gen.name != expected.get("generation"):
        raise CheckpointError(
            f"the experience memory in {directory} is {gen.name}, but the checkpoint was saved with "
            f"{expected.get('generation')}: the run stopped between saving the memory and the checkpoint, so "
            "they disagree; start the run again with --overwrite"
        )
    memory = ExperienceMemory.load(directory)
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
        if self.memory_dir is not None:
            payload["memory"] = agent.save_memory(self.memory_dir)
        save_checkpoint(self.directory, payload)
