"""Continual-learning methods, one module each, registered by name (``cl list strategies``)."""

from strategies import aper, finetune, joint, replay, sema, simplecil  # noqa: F401  (registration)
from strategies.aper import APER
from strategies.finetune import Finetune
from strategies.joint import Joint
from strategies.replay import Replay, ReplayMixin, SEMAReplay, with_replay
from strategies.sema import SEMA, AdapterPerTask
from strategies.simplecil import SimpleCIL

__all__ = ["APER", "SEMA", "AdapterPerTask", "Finetune", "Joint", "Replay", "ReplayMixin", "SEMAReplay", "SimpleCIL",
           "with_replay"]
