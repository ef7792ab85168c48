"""Routers that mix a layer's adapters from its pooled input, and key retrieval over the experience memory."""

from cl.routing.keys import KeyRouter, RouteLog
from cl.routing.routers import (
    ROUTERS,
    DescriptorRouter,
    FixedRouter,
    Router,
    SoftmaxRouter,
    TopKRouter,
    create_router,
)

__all__ = [
    "ROUTERS",
    "DescriptorRouter",
    "FixedRouter",
    "KeyRouter",
    "RouteLog",
    "Router",
    "SoftmaxRouter",
    "TopKRouter",
    "create_router",
]
