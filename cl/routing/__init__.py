"""Routing in one place: routers that mix a layer's adapters from its pooled input, key retrieval over the
experience memory, and the routes forced over pools (``routing``, ``routes_to``, ``routes_to_each``,
``adapters_off``)."""

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
from cl.routing.routes import OFF, Routes, adapters_off, routed, routes_to, routes_to_each, routing

__all__ = [
    "OFF",
    "ROUTERS",
    "DescriptorRouter",
    "FixedRouter",
    "KeyRouter",
    "RouteLog",
    "Router",
    "Routes",
    "SoftmaxRouter",
    "TopKRouter",
    "adapters_off",
    "create_router",
    "routed",
    "routes_to",
    "routes_to_each",
    "routing",
]
