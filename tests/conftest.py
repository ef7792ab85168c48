"""Test-wide settings: no network, no W&B uploads, few threads, deterministic seeds."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest
import torch

# CL_TEST_THREADS=1 when several test processes share the cores (each slows the others otherwise)
torch.set_num_threads(int(os.environ.get("CL_TEST_THREADS", min(2, os.cpu_count() or 1))))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _registries_restored():
    """What a test registers (a strategy, a scenario, ...) is gone after it: the registries are process-wide, and a
    test's entry would otherwise show up in later tests (``cl list``, did-you-mean suggestions)."""
    from cl import registry

    registries = [r for r in vars(registry).values() if isinstance(r, registry.Registry)]
    for r in registries:
        r._load()  # the built-in entries are in the snapshot (their modules import once)
    saved = [(dict(r._entries), dict(r._models)) for r in registries]
    yield
    for r, (entries, models) in zip(registries, saved, strict=True):
        r._entries.clear()
        r._entries.update(entries)
        r._models.clear()
        r._models.update(models)

