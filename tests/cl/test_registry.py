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
