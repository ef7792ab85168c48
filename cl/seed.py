"""Seeding and determinism."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

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
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; anything else as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available; use --set device=cpu")
    return dev


def rng_state() -> dict[str, Any]:
    """The python, numpy, torch (and CUDA) global random states, to continue a run exactly where it stopped."""
    return {
        "python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
