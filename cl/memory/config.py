"""``MemoryConfig``: the run config's ``memory:`` section, how the agent's experience memory is built.

    memory:
      index: auto      # auto (exact up to 10k vectors of a kind, then IVF with a tuned nprobe where it pays), flat, hnsw, ivf
      metric: ip       # ip (inner product: the journal's normalised vectors give cosine) or l2
      budget: null     # the most entries it may hold (null: no limit)
      path: memory     # its folder inside the run directory, saved with every checkpoint
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Literal

import pydantic

from cl.memory.memory import ExperienceMemory


class MemoryConfig(pydantic.BaseModel):
    """The agent's experience memory: its index kind, metric, budget and folder in the run directory."""

    model_config = pydantic.ConfigDict(extra="forbid")
    index: Literal["auto", "flat", "hnsw", "ivf"] = "auto"
    metric: Literal["ip", "l2"] = "ip"
    budget: int | None = pydantic.Field(None, ge=0)
    path: str = "memory"

    @pydantic.field_validator("path")
    @classmethod
    def _inside_the_run(cls, value: str) -> str:
        p = PurePosixPath(value)
        if not value or p.is_absolute() or ".." in p.parts or p == PurePosixPath("."):
            raise ValueError("a folder inside the run directory (relative, without '..'), e.g. memory")
        if p.parts[0] in ("checkpoints", "config.yaml", "metrics.json", "events.jsonl"):
            raise ValueError(f"{p.parts[0]} belongs to the run directory itself; choose another folder")
        return value

    def build(self, dim: int) -> ExperienceMemory:
        """An empty memory of ``dim``-wide vectors with these settings (the folder is the run's business)."""
        return ExperienceMemory(dim, metric=self.metric, index=self.index, budget=self.budget)
