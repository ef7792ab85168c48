"""``benchmarks.startup``: a real ``cl run`` of the default config reaches its first training batch without
importing the optional heavy packages (faiss, which the experience memory uses, loads when it first searches)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.startup import HEAVY, first_batch

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


@pytest.mark.realdata
@pytest.mark.skipif(not FMNIST.exists(), reason="needs Debian's dataset-fashion-mnist (make data)")
def test_cl_run_reaches_its_first_batch_without_the_optional_heavy_packages():
    probe = first_batch(threads=1, quick=True)
    assert probe["s"] > probe["cache_fill_s"] > 0 and probe["cpu_s"] > 0
    assert probe["heavy_imported"] == [], probe["heavy_imported"]  # faiss too: the memory imports it when used
    assert "wandb" in HEAVY and "torch.utils.tensorboard" in HEAVY
