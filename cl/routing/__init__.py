"""Routers that mix a layer's adapters from its pooled input."""

from cl.routing.routers import (
    ROUTERS,
    DescriptorRouter,
    FixedRouter,
    Router,
    SoftmaxRouter,
    TopKRouter,
    create_router,
)

__all__ = ["ROUTERS", "DescriptorRouter", "FixedRouter", "Router", "SoftmaxRouter", "TopKRouter", "create_router"]
