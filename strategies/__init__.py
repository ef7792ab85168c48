"""Continual-learning methods, one module each, registered by name (``cl list strategies``)."""

from strategies import finetune, joint, sema, simplecil  # noqa: F401  (registration)
from strategies.finetune import Finetune
from strategies.joint import Joint
from strategies.sema import SEMA
from strategies.simplecil import SimpleCIL

__all__ = ["SEMA", "Finetune", "Joint", "SimpleCIL"]
