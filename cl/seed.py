"""Seeding and determinism."""

from __future__ import annotations

import random
import sys
from typing import Any

import numpy as np
import torch
import torch.utils.deterministic

from cl.errors import ConfigError


def derive_seed(seed: int, *salt: int) -> int:
    """A 31-bit seed from the run seed and ``salt`` (experience, epoch...); stable across processes."""
    return hash((seed, *salt)) & 0x7FFFFFFF  # int tuples hash deterministically (no PYTHONHASHSEED)


def seed_everything(seed: int, *salt: int, deterministic: bool = True) -> None:
    """Seed python, numpy and torch from ``seed`` and ``salt`` (e.g. the experience id).

    Seeding per experience makes a resumed run draw the same numbers as an uninterrupted one.
    """
    s = derive_seed(seed, *salt)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    if deterministic:
        use_deterministic_algorithms()
        # ... without filling every new tensor with NaN first: that only makes a kernel that (wrongly) reads memory
        # it never wrote repeatable, and costs 7-13% of a CPU run (a write of every intermediate tensor)
        torch.utils.deterministic.fill_uninitialized_memory = False
        torch.backends.cudnn.benchmark = False


def use_deterministic_algorithms() -> None:
    """``torch.use_deterministic_algorithms(True, warn_only=True)``, without loading torch's compiler for it.

    torch's call imports ``torch._inductor`` (with ``torch._dynamo`` and sympy: the largest part of a ``cl run``'s
    start-up) only to set the compiler's own ``deterministic`` flag. Nothing here compiles, so that flag is set only
    when the compiler is already loaded; the eager flag is set either way.
    """
    if "torch._inductor.config" in sys.modules or not hasattr(torch._C, "_set_deterministic_algorithms"):
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch._C._set_deterministic_algorithms(True, warn_only=True)


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; anything else as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available; use --set device=cpu")
    return dev


def rng_state() -> dict[str, Any]:
    """The python, numpy, torch (and CUDA) global random states, to continue a run exactly where it stopped.

    Plain data and tensors only, so a checkpoint holding them loads with ``torch.load(weights_only=True)``:
    numpy's key is a list of ints, not an ndarray.
    """
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(), "numpy": (kind, key.tolist(), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def rng_state_problem(state: Any) -> str | None:
    """What makes ``state`` unlike a ``rng_state()`` (None when it is alike): checked before a resume uses it."""
    if not isinstance(state, dict) or not {"python", "numpy", "torch", "cuda"} <= set(state):
        return "it is not a dict with the keys python, numpy, torch, cuda"
    py, npy = state["python"], state["numpy"]
    if not (isinstance(py, tuple) and len(py) == 3 and type(py[0]) is int and isinstance(py[1], tuple)
            and len(py[1]) == 625 and all(type(v) is int for v in py[1]) and (py[2] is None or type(py[2]) is float)):
        return "its python state is not (version, 625 ints, gauss)"
    if not (isinstance(npy, tuple) and len(npy) == 5 and npy[0] == "MT19937" and isinstance(npy[1], list)
            and len(npy[1]) == 624 and all(type(v) is int and 0 <= v < 2**32 for v in npy[1])
            and all(type(v) is int for v in npy[2:4]) and isinstance(npy[4], float)):
        return "its numpy state is not ('MT19937', 624 ints, pos, has_gauss, gauss)"
    tensors = [state["torch"], *(state["cuda"] if isinstance(state["cuda"], list) else [None])]
    if not all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 1 for t in tensors):
        return "its torch or cuda state is not a uint8 tensor (cuda: a list of them)"
    return None


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` returned."""
    random.setstate(state["python"])
    kind, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(key, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
