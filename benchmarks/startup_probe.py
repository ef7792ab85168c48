"""The probe of ``benchmarks.startup``: a logger (``--import`` this file, ``--logger startup_probe``) that, at the
first training batch, writes the time, the process's CPU seconds, the prefix-cache fill seconds so far and the
imported modules to the file
named by ``$CL_STARTUP_PROBE``, then ends the process."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from cl.callbacks.base import Callback
from cl.registry import register_logger


@register_logger("startup_probe")
class StartupProbe(Callback):
    """Ends the run at its first training batch (a benchmark probe, not a logger to use)."""

    def before_iteration(self, agent: Any, iteration: int) -> None:
        now = time.time()
        wall, _ = agent.ctx.clock.totals()
        report = {"time": now, "cpu_s": time.process_time(), "cache_fill_s": wall.get("cache_fill", 0.0),
                  "modules": sorted(sys.modules)}
        with open(os.environ["CL_STARTUP_PROBE"], "w") as f:
            json.dump(report, f)
        os._exit(0)
