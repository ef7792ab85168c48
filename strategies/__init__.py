"""Continual-learning methods, one module each, registered by name (``cl list strategies``)."""

from strategies import aper, finetune, joint, sema, simplecil  # noqa: F401  (registration)
from strategies.aper import APER
from strategies.finetune import Finetune
from strategies.joint import Joint
from strategies.sema import SEMA, AdapterPerTask
from strategies.simplecil import SimpleCIL

__all__ = ["APER", "SEMA", "AdapterPerTask", "Finetune", "Joint", "SimpleCIL"]
