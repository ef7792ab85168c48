"""Adapters on backbone blocks: modules, their config, pools by name, and injection."""

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
    adapters_off,
    capturing,
    inject,
    pools,
    routes_to,
    routing,
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
    "adapters_off",
    "build_adapter",
    "capturing",
    "inject",
    "pools",
    "routes_to",
    "routing",
]
