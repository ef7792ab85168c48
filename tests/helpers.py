"""Shared test settings: the tiny configs every engine test runs on."""

from __future__ import annotations

from typing import Any

TINY_SCENARIO = {"name": "synthetic", "n_classes": 6, "n_experiences": 3, "train_per_class": 24,
                 "test_per_class": 12, "image_size": 16}
TINY_BACKBONE = {"name": "vit_tiny_test"}


def tiny_config(tmp_path, strategy: str = "finetune", **strategy_params: Any) -> dict[str, Any]:
    """A run config on the synthetic stream and the tiny random ViT."""
    return {
        "seed": 0, "device": "cpu", "out": str(tmp_path / "run"), "progress": False,
        "scenario": dict(TINY_SCENARIO), "backbone": dict(TINY_BACKBONE),
        "strategy": {"name": strategy, **strategy_params}, "eval": {"batch_size": 64},
    }
