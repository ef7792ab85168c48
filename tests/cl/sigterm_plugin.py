"""A test plugin (``cl run --import``): ``finetune`` whose rank 1 sends itself SIGTERM during experience 1's second
training step when ``CL_TEST_SIGTERM=1``."""

from __future__ import annotations

import os
import signal

from cl import distributed as dist
from cl.registry import register_strategy
from strategies.finetune import Finetune


@register_strategy("finetune_sigterm")
class FinetuneSigterm(Finetune):
    steps = 0

    def training_step(self, state, y):
        if self.experience.id == 1:
            self.steps += 1
            if self.steps == 2 and dist.rank() == 1 and os.environ.get("CL_TEST_SIGTERM") == "1":
                os.kill(os.getpid(), signal.SIGTERM)
        return super().training_step(state, y)
