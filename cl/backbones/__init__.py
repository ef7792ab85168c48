"""Backbones: a registry of pretrained models split into stem, adaptable blocks and pool.

``create_backbone(name, **params)`` is the one door in; besides the registered names it accepts
any timm VisionTransformer name (``"vit_large_patch14_clip_224"``), built by the ``timm_vit`` entry.
"""

import os

# Everything here runs offline: never let a hub client wait on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from typing import Any

from cl.backbones import efficientnet, minilm, open_clip_vit, timm_vit  # noqa: F401  (registration)
from cl.backbones.base import Backbone, State
from cl.backbones.preprocess import DataConfig
from cl.backbones.timm_import import import_timm
from cl.backbones.timm_vit import resolve_timm_name
from cl.registry import BACKBONES

__all__ = ["Backbone", "DataConfig", "State", "create_backbone", "import_libraries", "list_backbones",
           "resolve_timm_name"]


def create_backbone(name: str, **params: Any) -> Backbone:
    """A backbone by registry name, or by timm ViT name; unknown names raise ConfigError with a suggestion."""
    if name not in BACKBONES and resolve_timm_name(name):
        return BACKBONES.create("timm_vit", model_name=name, **params)
    return BACKBONES.create(name, **params)


def import_libraries(name: str) -> None:
    """Import the libraries ``create_backbone(name)`` builds with, as its entry declares (``declares_imports``); a
    name that is not registered may be a timm ViT name: timm. Building the backbone later finds them imported."""
    load = getattr(BACKBONES.get(name), "load_imports", None) if name in BACKBONES else import_timm
    if load is not None:
        load()


def list_backbones(pattern: str = "*") -> list[str]:
    """Registered backbone names matching a shell-style wildcard (timm ViT names work too)."""
    return BACKBONES.names(pattern)
