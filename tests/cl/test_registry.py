"""Registries: parameters validated from signatures, including those forwarded to a base with ``**kw``."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from cl.errors import ConfigError
from cl.registry import Registry


class Base:
    def __init__(self, model: Any, *, epochs: int = 1, lr: float = 1e-3) -> None:
        self.epochs, self.lr = epochs, lr


class Child(Base):
    param_defaults: ClassVar[dict[str, Any]] = {"epochs": 3}

    def __init__(self, model: Any, *, width: int = 8, **kw: Any) -> None:
        super().__init__(model, **{**self.param_defaults, **kw})
        self.width = width


class Sealed(Base):
    def __init__(self, model: Any, *, width: int = 8) -> None:  # forwards nothing: no inherited keys
        super().__init__(model)


def test_keyword_parameters_forwarded_to_a_base_are_validated_with_the_subclass_defaults():
    reg = Registry("thing", n_positional=1)
    reg.register("child")(Child)
    reg.register("sealed")(Sealed)
    assert reg.validate("child", {}) == {"width": 8, "epochs": 3, "lr": 1e-3}
    assert reg.create("child", None, lr=0.5).lr == 0.5 and Child(None).epochs == 3
    assert reg.validate("sealed", {}) == {"width": 8}
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        reg.validate("child", {"epoch": 2})
    with pytest.raises(ConfigError, match=r"bad value .* 'lr'"):
        reg.validate("child", {"lr": "fast"})


class GrandChild(Child):
    param_defaults: ClassVar[dict[str, Any]] = {"lr": 0.5}  # over Child's: epochs stays 3

    def __init__(self, model: Any, *, depth: int = 1, **kw: Any) -> None:
        super().__init__(model, **kw)
        self.depth = depth


class Fixed(Child):
    hidden_params = ("lr",)  # fixed by the class: neither shown nor taken


def test_param_defaults_merge_over_the_bases_and_hidden_params_are_not_taken():
    reg = Registry("thing", n_positional=1)
    reg.register("grandchild")(GrandChild)
    reg.register("fixed")(Fixed)
    assert reg.validate("grandchild", {}) == {"depth": 1, "width": 8, "epochs": 3, "lr": 0.5}
    assert reg.validate("fixed", {}) == {"width": 8, "epochs": 3}
    with pytest.raises(ConfigError, match="unknown key 'lr'"):
        reg.validate("fixed", {"lr": 0.1})


def test_a_strategy_that_does_not_train_hides_the_training_parameters():
    """``trains = False``: ``epochs``, ``lr``, ``optimizer``, ``weight_decay``, ``plateau_*`` are neither shown nor
    taken, and the strategy never steps an optimiser (epochs 0)."""
    import strategies  # noqa: F401  (registers simplecil)
    from cl.registry import STRATEGIES
    from cl.strategy import TRAINING_PARAMS, Strategy

    class Counts(Strategy):
        trains = False

        def __init__(self, backbone: Any, *, decay: float = 1.0, **kw: Any) -> None:
            super().__init__(backbone, **kw)
            self.decay = decay

    reg = Registry("strategy", n_positional=1)
    reg.register("counts")(Counts)
    assert set(reg.params_model("counts").model_fields) == {"decay", "batch_size", "cache_prefix"}
    assert set(TRAINING_PARAMS) == {"epochs", "lr", "optimizer", "weight_decay", "plateau_delta", "plateau_patience",
                                    "plateau_every"}
    for key in TRAINING_PARAMS:
        with pytest.raises(ConfigError, match=f"unknown key '{key}'"):
            reg.validate("counts", {key: 1})
        assert key not in STRATEGIES.params_model("simplecil").model_fields
    assert "epochs" in STRATEGIES.params_model("finetune").model_fields  # a training strategy shows them
    from cl.backbones import create_backbone

    assert Counts(create_backbone("vit_tiny_test"), epochs=5).epochs == 0  # and never trains, even when asked
