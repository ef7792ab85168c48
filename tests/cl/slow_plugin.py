"""A test plugin (``cl run --import``): ``simplecil_slow``, SimpleCIL that pauses before each experience, so a run
holds its run directory long enough for a second process started with it to meet its lock."""

from __future__ import annotations

import time

from cl.registry import register_strategy
from strategies.simplecil import SimpleCIL


@register_strategy("simplecil_slow")
class SimpleCILSlow(SimpleCIL):
    pause_s = 4.0

    def before_experience(self, exp) -> None:
        time.sleep(self.pause_s)
        super().before_experience(exp)
