"""A test plugin (``cl run --import``): ``finetune`` that SIGKILLs its own process as experience 1 starts, just
after experience 0's checkpoint, when ``CL_TEST_SIGKILL=1``."""

from __future__ import annotations

import os
import signal

from cl.registry import register_strategy
from strategies.finetune import Finetune


@register_strategy("finetune_sigkill")
class FinetuneSigkill(Finetune):
    def before_experience(self, exp):
        if exp.id == 1 and os.environ.get("CL_TEST_SIGKILL") == "1":
            os.kill(os.getpid(), signal.SIGKILL)
        super().before_experience(exp)
