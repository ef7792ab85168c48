"""Adapters on backbone blocks: modules, their config, pools by name, and injection (routes over pools:
``cl.routing``)."""

from cl.adapters.modules import (
    ADAPTERS,
    SSF,
    AdapterConfig,
    BlockShape,
    Bottleneck,
    LoRA,
    RankOne,
    build_adapter,
)
from cl.adapters.pool import (
    AdaptedBlock,
    AdapterPool,
    capturing,
    inject,
    pools,
)

__all__ = [
    "ADAPTERS",
    "SSF",
    "AdaptedBlock",
    "AdapterConfig",
    "AdapterPool",
    "BlockShape",
    "Bottleneck",
    "LoRA",
    "RankOne",
    "build_adapter",
    "capturing",
    "inject",
    "pools",
]
