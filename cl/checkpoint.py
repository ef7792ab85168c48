"""Atomic, checksummed checkpoints and the callback that writes one after every experience.

A checkpoint is ``checkpoints/last.pt`` plus ``last.json`` (format version, sha256, experiences
done). Writes go to a temporary file, are fsynced and renamed, so a crash mid-save leaves the
previous checkpoint intact; a file whose checksum does not match is rejected.
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


class Checkpointer(Callback):
    """Saves strategy and callback state after each experience (the last callback in the list)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def after_experience(self, agent: Any, exp: Any) -> None:
        save_checkpoint(self.directory, agent.checkpoint_payload())
