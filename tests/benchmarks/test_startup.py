"""``benchmarks.startup``: a real ``cl run`` of the default config reaches its first training batch without
importing the optional heavy packages a default run does not use (only the experience memory's faiss)."""

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
    assert set(probe["heavy_imported"]) <= {"faiss"}, probe["heavy_imported"]
    assert "wandb" in HEAVY and "torch.utils.tensorboard" in HEAVY
