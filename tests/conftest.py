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
def _test_registrations_removed():
    """What a test module registers inside a test (a strategy class defined in ``tests/``) is gone after it: the
    registries are process-wide, and such an entry would otherwise show up in later tests (``cl list``, did-you-mean
    suggestions). Plugins a test imports (``--import`` files, examples/) stay: their modules import once."""
    from cl import registry

    registries = [r for r in vars(registry).values() if isinstance(r, registry.Registry)]
    before = [set(r._entries) for r in registries]
    yield
    for r, names in zip(registries, before, strict=True):
        for name in set(r._entries) - names:
            if getattr(r._entries[name], "__module__", "").startswith("tests."):
                del r._entries[name]
                r._models.pop(name, None)
