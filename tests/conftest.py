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
