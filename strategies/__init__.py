"""Continual-learning methods, one module each, registered by name (``cl list strategies``)."""

from cl.replay import ReplayMixin, with_replay  # re-exported: replay composes with any strategy
from strategies import aper, finetune, joint, key_retrieval, lae, mos, replay, sema, simplecil  # noqa: F401
from strategies.aper import APER
from strategies.finetune import Finetune
from strategies.joint import Joint
from strategies.key_retrieval import KeyRetrieval
from strategies.lae import LAE
from strategies.mos import MOS
from strategies.replay import Replay
from strategies.sema import SEMA, AdapterPerTask, SEMAReplay
from strategies.simplecil import SimpleCIL

__all__ = ["APER", "LAE", "MOS", "SEMA", "AdapterPerTask", "Finetune", "Joint", "KeyRetrieval", "Replay", "ReplayMixin",
           "SEMAReplay", "SimpleCIL", "with_replay"]
