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

Loading never runs code from the files: a payload holds tensors and plain data only (dict, list, tuple, str, int,
float, bool, None; ``save_checkpoint`` refuses anything else) and is read with ``torch.load(weights_only=True)``,
whose unpickler builds nothing but those. The sha256 in the manifest catches truncation and corruption, not
tampering (whoever can replace the .pt can rewrite the manifest); what keeps a crafted file harmless is the
restricted unpickler, and what keeps it from crashing the engine is ``payload_problem``, which checks the keys
and types a payload must have. Format 1 (before numpy's RNG state was saved as a list) is read the same way,
with numpy's ndarray rebuilding allowed, and converted; anything else in an old file is refused.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import re
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cl.callbacks.base import Callback
from cl.errors import CheckpointError
from cl.memory import ExperienceMemory
from cl.memory.persist import live_generation, prune, read_generation, retain, write_atomic
from cl.seed import rng_state_problem

FORMAT_VERSION = 2  # 2: payloads are tensors and plain data only (numpy's RNG key a list), read with weights_only
READABLE_FORMATS = (1, 2)
# What the weights-only unpickler may build beyond tensors and plain data, for format 1 only: numpy's RNG state
# (an uint32 ndarray) in resume points. These rebuild an array from its shape, dtype and bytes, and run nothing else.
FORMAT1_GLOBALS = [np.ndarray, np.dtype, np._core.multiarray._reconstruct, type(np.dtype(np.uint32))]
PLAIN = (dict, OrderedDict, list, tuple, str, int, float, bool, type(None), torch.Tensor, torch.nn.Parameter,
         torch.Size, torch.dtype, torch.device)
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
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version not in READABLE_FORMATS or type(version) is not int:
        why = "a newer clagent wrote it" if type(version) is int and version > FORMAT_VERSION else \
            "a foreign file or another clagent version"
        raise CheckpointError(f"checkpoint {man.stem} in {man.parent} has format {version!r}, this clagent "
                              f"reads {' and '.join(map(str, READABLE_FORMATS))} ({why})")
    return manifest


def _unpickle(data: bytes, pt: Path, version: int, map_location: str) -> Any:
    """The payload in ``data``, built by torch's weights-only unpickler (tensors and plain data, nothing run)."""
    allowed = FORMAT1_GLOBALS if version == 1 else []
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(allowed):
            warnings.simplefilter("ignore")  # a foreign pickle's protocol warning: the error below says it all
            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:
        text = str(e)
        found = re.search(r"GLOBAL (\S+)", text)
        if found is None:
            detail = re.search(r"WeightsUnpickler error: \s*(\S[^\n]*)", text)
            reason = detail.group(1) if detail else (text.strip().splitlines() or [""])[0][:200]
            raise CheckpointError(f"checkpoint {pt} is not a clagent checkpoint (it cannot be read as tensors and "
                                  f"plain data: {type(e).__name__}: {reason})") from None
        old = ""
        if version == 1:
            fix = (f"delete {pt} and {pt.with_suffix('.json')} and resume, to repeat its experience from the start"
                   if pt.name.startswith(PARTIAL) else "start the run again with --overwrite")
            old = f" (an older clagent, format 1, wrote objects this clagent no longer loads: {fix})"
        raise CheckpointError(f"checkpoint {pt} is not a clagent checkpoint: it holds a pickled {found.group(1)}, "
                              "where clagent saves only tensors and plain data, and it is not unpickled (that could "
                              f"run code){old}") from None


def _ndarrays_to_lists(obj: Any) -> Any:
    """A format-1 payload with its ndarrays (numpy's RNG key) as lists, as format 2 saves them."""
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, dict):
        return type(obj)((k, _ndarrays_to_lists(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_ndarrays_to_lists(v) for v in obj)
    return obj


def _load(man: Path, map_location: str, require: tuple[str, ...] = ()) -> dict[str, Any]:
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
    version = manifest["format_version"]
    payload = _unpickle(data, pt, version, map_location)
    if version == 1:
        payload = _ndarrays_to_lists(payload)
    if not isinstance(payload, dict) or "experiences_done" not in payload:
        raise CheckpointError(f"checkpoint {pt} is not a clagent checkpoint (it holds no experiences_done)")
    if payload.get("format_version") != version:
        raise CheckpointError(f"checkpoint {pt} is not a clagent checkpoint (its payload has format "
                              f"{payload.get('format_version')!r}, its manifest {version})")
    if (problem := payload_problem(payload, require)) is not None:
        raise CheckpointError(f"checkpoint {pt} is not a valid clagent checkpoint: {problem}")
    return payload


def plain_data_problem(obj: Any, where: str = "payload") -> str | None:
    """Where ``obj`` holds something other than tensors and plain data (None when it does not): only those load
    with ``torch.load(weights_only=True)``."""
    if type(obj) not in PLAIN:
        hint = "; save a sorted list" if isinstance(obj, (set, frozenset)) else ""
        return (f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}, not tensors or plain data "
                f"(dict, list, tuple, str, int, float, bool, None){hint}")
    if isinstance(obj, dict):
        for k, v in obj.items():
            if type(k) not in (str, int):
                return f"{where} has a key {k!r} that is not a str or an int"
            if (problem := plain_data_problem(v, f"{where}[{k!r}]")) is not None:
                return problem
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            if (problem := plain_data_problem(v, f"{where}[{i}]")) is not None:
                return problem
    return None


def _is_int(x: Any) -> bool:
    return type(x) is int


def _state_problem(state: Any, where: str) -> str | None:
    """A strategy state: str keys, tensors (``..._extra_state`` entries: plain data)."""
    if not isinstance(state, dict):
        return f"{where} is a {type(state).__name__}, not a dict"
    for k, v in state.items():
        if not isinstance(k, str):
            return f"{where} has a key {k!r} that is not a str"
        if not k.endswith("_extra_state") and not isinstance(v, torch.Tensor):
            return f"{where}[{k!r}] is a {type(v).__name__}, not a tensor"
    return None


def _resume_point_problem(point: Any) -> str | None:
    if not isinstance(point, dict):
        return f"resume_point is a {type(point).__name__}, not a dict"
    ints = ("experience", "call", "epoch", "step", "count")
    missing = [k for k in (*ints, "total", "epoch_logs", "done", "rng", "optimizer", "state") if k not in point]
    if missing:
        return f"resume_point has no {', '.join(missing)}"
    if bad := [k for k in ints if not _is_int(point[k])]:
        return f"resume_point's {', '.join(bad)} must be ints"
    if type(point["total"]) not in (int, float):
        return "resume_point's total must be a number"
    optimizer = point["optimizer"]
    if not (isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict)
            and isinstance(optimizer.get("param_groups"), list)):
        return "resume_point's optimizer is not an optimizer state dict (state, param_groups)"
    done = point["done"]
    if not isinstance(done, list) or not all(isinstance(d, dict) for d in done) or len(done) != point["call"]:
        return "resume_point's done is not a list of one dict per earlier training loop (call)"
    for i, d in enumerate([point, *point["done"]]):
        where = "resume_point" if i == 0 else f"resume_point's done[{i - 1}]"
        if (problem := rng_state_problem(d.get("rng"))) is not None:
            return f"{where}'s rng: {problem}"
        logs = d.get("epoch_logs")
        if not (isinstance(logs, list) and all(isinstance(e, (list, tuple)) and len(e) == 2 and _is_int(e[0])
                                                and isinstance(e[1], dict) for e in logs)):
            return f"{where}'s epoch_logs is not a list of (epoch, dict)"
        if (problem := _state_problem(d.get("state"), f"{where}'s state")) is not None:
            return problem
    return None


def payload_problem(payload: dict[str, Any], require: tuple[str, ...] = ()) -> str | None:
    """What is wrong with a loaded payload's keys and types (None when nothing is): each key it holds must have
    the type the engine expects, and the keys in ``require`` must be there."""
    if missing := [k for k in ("experiences_done", *require) if k not in payload]:
        return f"it has no {', '.join(repr(k) for k in missing)}"
    done = payload["experiences_done"]
    if not isinstance(done, list) or not all(_is_int(i) for i in done):
        return "'experiences_done' is not a list of experience ids (ints)"
    if "strategy" in payload and (problem := _state_problem(payload["strategy"], "'strategy'")) is not None:
        return problem
    callbacks = payload.get("callbacks", {})
    if not isinstance(callbacks, dict) or not all(isinstance(k, str) and isinstance(v, dict)
                                                  for k, v in callbacks.items()):
        return "'callbacks' is not a dict of callback states (dicts)"
    memory = payload.get("memory")
    if memory is not None and not (isinstance(memory, dict) and isinstance(memory.get("generation"), str)
                                   and _is_int(memory.get("entries"))):
        return "'memory' is not {'generation': str, 'entries': int}"
    if "spec" in payload and not isinstance(payload["spec"], dict):
        return "'spec' is not a dict"
    if "resume_point" in payload:
        return _resume_point_problem(payload["resume_point"])
    return None


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


def newest_checkpoint(directory: str | Path, name: str = "ckpt") -> Path | None:
    """The payload file of the newest committed checkpoint (the one ``load_checkpoint`` reads), or None."""
    found = _manifests(Path(directory), name)
    return found[0].with_suffix(".pt") if found else None


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
    """Commit ``payload`` as the next ``directory/name-N.pt`` with its manifest, then delete all but the newest
    ``KEEP_CHECKPOINTS``; returns the .pt path. The payload must be tensors and plain data (``plain_data_problem``),
    else CheckpointError says which entry is not. A full disk raises CheckpointError and leaves the previous
    checkpoint as it was."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(directory, name)
    number = max((n for n, _ in _committed(directory, name)), default=0) + 1
    if (problem := plain_data_problem(payload)) is not None:  # it would not load again (weights_only)
        raise CheckpointError(f"cannot save checkpoint {name}-{number:06d} in {directory}: {problem}")
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


def load_checkpoint(directory: str | Path, name: str = "ckpt", map_location: str = "cpu",
                    require: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read and verify the newest checkpoint in ``directory`` (tensors and plain data only: nothing in it runs),
    which must hold the keys ``require``; raises CheckpointError saying what is wrong and, when the newest is
    unreadable, naming the last good one and how to resume from it."""
    directory = Path(directory)
    found = _manifests(directory, name)
    if not found:
        raise CheckpointError(f"no checkpoint in {directory} (expected {name}-NNNNNN.pt and {name}-NNNNNN.json)")
    problems: list[str] = []
    for man in found:
        try:
            payload = _load(man, map_location, require)
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
