"""``Context``: what the engine lends a strategy (device, callbacks, progress, seeding, prefix cache, experience
memory, rank, stop requests and resume points), and ``Learner``, what a strategy may read of the agent."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from cl import distributed as dist
from cl.cache import PrefixCache
from cl.experience import Experience
from cl.interrupt import RunInterrupted
from cl.phases import PhaseClock
from cl.seed import derive_seed

if TYPE_CHECKING:
    from cl.callbacks.base import CallbackList
    from cl.interrupt import GracefulStop
    from cl.journal import Journal
    from cl.memory import ExperienceMemory
    from cl.progress import Progress


class Learner(Protocol):
    """What a strategy may read of the agent that drives it (``cl.agent.Agent``)."""

    seen: list[Experience]  # the experiences learned so far, in order
    journal: Journal | None  # what each of them taught (None: no journal)


@dataclass
class Context:
    """What the engine lends a strategy: device, callbacks, progress, seeding, cache, memory, rank."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    callbacks: CallbackList | None = None  # the agent's, in order (None: nobody listens)
    agent: Learner | None = None  # the agent that drives the strategy (None: the strategy is used on its own)
    progress: Progress | None = None
    cache: PrefixCache | None = field(default_factory=PrefixCache)
    memory: ExperienceMemory | None = None  # the agent's (``Strategy.memory``: one of its own if None)
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    eval_batch_size: int = 256
    #: batch of the prefix-cache fill (None: ``eval_batch_size`` on a GPU, at most 32 on a CPU, where the fill runs one
    #: batch per torch thread at once and larger batches' feature maps fall out of the caches: ``benchmarks.fill``)
    fill_batch_size: int | None = None
    stop: GracefulStop | None = None  # the run's (None: signals are not intercepted)
    # periodic resume points: ``on_resume_point(point)`` saves one (rank 0), at most every ``resume_interval_s``
    resume_interval_s: float | None = None
    on_resume_point: Callable[[dict[str, Any]], None] | None = None
    last_resume_point: float = field(default_factory=time.monotonic)
    clock: PhaseClock = field(default_factory=PhaseClock)  # where the time goes (``phase``)

    def fill_batch(self) -> int:
        """The batch size of a prefix-cache fill (``fill_batch_size``)."""
        if self.fill_batch_size is not None:
            return self.fill_batch_size
        return self.eval_batch_size if self.device.type == "cuda" else min(self.eval_batch_size, 32)

    def phase(self, name: str) -> AbstractContextManager[None]:
        """Count the time inside the ``with`` block to phase ``name`` (``cl.phases``: cache_fill, train, ...)."""
        return self.clock.phase(name)

    def resume_point_due(self) -> bool:
        """Whether a periodic resume point is due (decided by rank 0's clock: every rank must call this at the
        same points, e.g. after each training step)."""
        if self.resume_interval_s is None:
            return False
        due = dist.broadcast(time.monotonic() - self.last_resume_point >= self.resume_interval_s)
        if due:
            self.last_resume_point = time.monotonic()
        return due

    def check_stop(self, where: str) -> None:
        """Raise ``RunInterrupted`` if a stop was requested (on any rank: every rank must call this at the same
        points of the run, e.g. after each training step)."""
        requested = self.stop is not None and self.stop.requested is not None
        if dist.any_rank(requested):
            name = self.stop.requested if requested else "a signal on another rank"
            raise RunInterrupted(f"stopped by {name} {where}", signal_name=name)

    def generator(self, *salt: int) -> torch.Generator:
        """A CPU generator seeded from the run seed and ``salt`` (e.g. experience, epoch)."""
        return torch.Generator().manual_seed(derive_seed(self.seed, *salt))
