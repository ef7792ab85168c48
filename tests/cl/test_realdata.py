"""Real offline data and weights: a small Split-FashionMNIST run with the ImageNet EfficientNet-Lite0."""

from __future__ import annotations

from pathlib import Path

import pytest

from cl.run import run

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(not FMNIST.exists(), reason="needs Debian dataset-fashion-mnist (make test installs it)"),
]


def small_fmnist(tmp_path, strategy: str, weights: str) -> dict:
    return {
        "seed": 0, "device": "cpu", "out": str(tmp_path / f"{strategy}-{weights}"), "progress": False,
        "scenario": {"name": "split_fmnist", "n_experiences": 5, "train_per_class": 100, "test_per_class": 50},
        "backbone": {"name": "efficientnet_lite0", "weights": weights, "img_size": 64},
        "strategy": {"name": strategy},
    }


def test_simplecil_with_real_weights_beats_random_init(tmp_path):
    real = run(small_fmnist(tmp_path, "simplecil", "imagenet"))
    rand = run(small_fmnist(tmp_path, "simplecil", "none"))
    assert real["final_accuracy"] > 0.65
    assert real["final_accuracy"] > rand["final_accuracy"] + 0.05
    assert len(real["accuracy_matrix"]) == 5


def test_finetune_forgets_on_real_data(tmp_path):
    m = run({**small_fmnist(tmp_path, "finetune", "imagenet"), "strategy": {"name": "finetune", "epochs": 2}})
    assert m["avg_forgetting"] > 0.3
