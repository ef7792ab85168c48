"""Continual-learning methods, one module each, registered by name (``cl list strategies``)."""

from strategies import finetune, joint, simplecil  # noqa: F401  (registration)
from strategies.finetune import Finetune
from strategies.joint import Joint
from strategies.simplecil import SimpleCIL

__all__ = ["Finetune", "Joint", "SimpleCIL"]
