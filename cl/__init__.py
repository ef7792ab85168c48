"""clagent's engine: backbones, strategies' building blocks, callbacks, metrics, config and CLI.

The Python surface::

    from cl import Agent
    from scenarios import split_fmnist
"""

from __future__ import annotations

__version__ = "0.1.0"

from typing import Any

__all__ = ["Agent", "Strategy", "__version__", "run"]


def __getattr__(name: str) -> Any:  # lazy: `cl list` and config parsing need not import torch models
    if name == "Agent":
        from cl.agent import Agent

        return Agent
    if name == "Strategy":
        from cl.strategy import Strategy

        return Strategy
    if name == "run":
        from cl.run import run

        return run
    raise AttributeError(name)
