"""Seeding and determinism."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int, *salt: int, deterministic: bool = True) -> None:
    """Seed python, numpy and torch from ``seed`` and ``salt`` (e.g. the experience id).

    Seeding per experience makes a resumed run draw the same numbers as an uninterrupted one.
    """
    s = hash((seed, *salt)) & 0x7FFFFFFF
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
        from cl.errors import ConfigError

        raise ConfigError(f"device {device!r} requested but CUDA is not available; use --set device=cpu")
    return dev
