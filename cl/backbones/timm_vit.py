"""Any timm VisionTransformer as a backbone: by registry alias, by the generic ``timm_vit`` entry,
or by any timm ViT name (see ``resolve_timm_name``).

Args:
    model_name: the timm architecture (``timm_vit`` only), e.g. ``vit_base_patch16_224``.
    pretrained: load timm's pretrained weights (needs the model hub or its cache; offline, give ``checkpoint``).
    checkpoint: a local weights file (.pth, .pt, .bin or .safetensors) to load instead.
    img_size: input side in pixels (None: the architecture's own).
    model_kwargs: further ``timm.create_model`` arguments (``timm_vit`` only), e.g. ``{"drop_path_rate": 0.1}``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cl.backbones.base import Backbone, InputSize, declares_imports, declares_min_input_size
from cl.backbones.checkpoint import drop_keys, load_strict, read_state_dict, strip_prefixes
from cl.backbones.preprocess import DataConfig
from cl.backbones.timm_import import import_timm
from cl.errors import ConfigError
from cl.registry import register_backbone

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

#: timm modules whose models are ``VisionTransformer`` instances
_TIMM_VIT_MODULES = ("vision_transformer", "vision_transformer_hybrid")


class TimmViT(Backbone):
    """stem = patch_embed + pos_embed + patch_drop + norm_pre; blocks = timm blocks; pool = norm + head."""

    block_kind = "token"

    def __init__(self, model: VisionTransformer, name: str, weights: str) -> None:
        super().__init__()
        from timm.data import resolve_data_config

        self.model = model
        self.name = name
        self.weights = weights
        self.embed_dim = int(getattr(model, "head_hidden_size", model.num_features))
        cfg = resolve_data_config({}, model=model)
        self.data_config = DataConfig(
            input_size=(3, *model.patch_embed.img_size),  # the timm cfg keeps 224 when img_size changes
            mean=tuple(cfg["mean"]),
            std=tuple(cfg["std"]),
        )
        self.min_input_size = max(model.patch_embed.patch_size)  # fewer pixels than a patch: no token

    @property
    def blocks(self) -> nn.Sequential:
        return self.model.blocks

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))

    def forward_pool(self, state: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.norm(state), pre_logits=True)

    def block_dims(self) -> list[int]:
        return [self.model.embed_dim] * self.num_blocks


def vit_input_size(timm_name: str, img_size: int | None, model_kwargs: dict[str, Any] | None) -> InputSize | None:
    """The image side and minimum (one patch) of a timm ViT, from its name (``..._patchN_...``) or
    ``model_kwargs["patch_size"]``; None when the side is the model's default or the patch size is not in the name."""
    patch = (model_kwargs or {}).get("patch_size")
    if patch is None and (m := re.search(r"patch(\d+)", timm_name)):
        patch = int(m[1])
    if img_size is None or not isinstance(patch, int):
        return None
    return InputSize("img_size", img_size, patch, "its patch size")


def resolve_timm_name(name: str) -> str | None:
    """``name`` when timm knows it as a VisionTransformer (``arch`` or ``arch.tag``), else None."""
    timm = import_timm()
    from timm.models import split_model_name_tag

    arch, _ = split_model_name_tag(name)
    return name if arch in timm.list_models(module=list(_TIMM_VIT_MODULES)) else None


def build_timm_vit(
    timm_name: str,
    name: str,
    pretrained: bool = False,
    checkpoint: str | None = None,
    img_size: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> TimmViT:
    """Create the timm model, then load weights from ``checkpoint`` or timm's cache."""
    timm = import_timm()
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    if pretrained and checkpoint:
        raise ConfigError("give either pretrained=True or checkpoint=PATH, not both")
    if resolve_timm_name(timm_name) is None:
        raise ConfigError(f"{timm_name!r} is not a timm VisionTransformer (see timm.list_models('vit_*'))")
    kwargs = {**(model_kwargs or {}), "num_classes": 0}
    if img_size is not None:
        kwargs["img_size"] = img_size
    try:
        model = timm.create_model(timm_name, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError) as e:
        if not pretrained:
            raise ConfigError(f"cannot create timm model {timm_name!r}: {e}") from e
        raise ConfigError(
            f"could not load pretrained weights for {timm_name!r}: no model hub is reachable and they are "
            f"not in the local timm/HF cache ({type(e).__name__}: {e}). Pass checkpoint=PATH to a state "
            "dict file, or fill the cache on a machine with network access."
        ) from e
    except TypeError as e:
        raise ConfigError(f"bad model_kwargs for timm model {timm_name!r}: {e}") from e
    if not isinstance(model, VisionTransformer):
        raise ConfigError(f"timm model {timm_name!r} is a {type(model).__name__}, not a VisionTransformer")
    weights = "random init"
    if pretrained:
        weights = f"timm {model.pretrained_cfg.get('architecture')}.{model.pretrained_cfg.get('tag')}"
    elif checkpoint:
        state = strip_prefixes(read_state_dict(checkpoint))
        state = checkpoint_filter_fn(state, model)  # converts CLIP/DINOv2 layouts, resamples pos_embed
        load_strict(model, drop_keys(state, ("head.", "head_dist.")), f"checkpoint {checkpoint!r}")
        weights = f"checkpoint {checkpoint}"
    return TimmViT(model, name, weights)


@register_backbone("timm_vit")
@declares_imports(import_timm)
@declares_min_input_size(lambda p: vit_input_size(p["model_name"], p["img_size"], p["model_kwargs"]))
def timm_vit(
    model_name: str = "vit_base_patch16_224",
    pretrained: bool = False,
    checkpoint: str | None = None,
    img_size: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> TimmViT:
    """Any timm ViT by name (``model_kwargs`` go to ``timm.create_model``, e.g. drop_path_rate)."""
    return build_timm_vit(model_name, model_name, pretrained, checkpoint, img_size, model_kwargs)


def _register_alias(
    name: str, timm_name: str, doc: str, img_size: int | None = None, **model_kwargs: Any
) -> None:
    """Register ``name`` as a fixed timm architecture; ``img_size`` becomes the entry's default."""
    default_img_size = img_size

    def entry(
        pretrained: bool = False, checkpoint: str | None = None, img_size: int | None = default_img_size
    ) -> TimmViT:
        return build_timm_vit(timm_name, name, pretrained, checkpoint, img_size, model_kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = doc
    size_rule = declares_min_input_size(lambda p: vit_input_size(timm_name, p["img_size"], model_kwargs))
    register_backbone(name)(declares_imports(import_timm)(size_rule(entry)))


_register_alias("vit_base_patch16_224", "vit_base_patch16_224", "ViT-B/16, 224 px (timm, in21k -> in1k).")
_register_alias(
    "vit_base_patch16_224_in21k", "vit_base_patch16_224.augreg_in21k", "ViT-B/16, 224 px (timm, in21k)."
)
_register_alias("vit_small_patch16_224", "vit_small_patch16_224", "ViT-S/16 at 224 px (timm).")
_register_alias(
    "vit_tiny_test",
    "vit_tiny_patch16_224",
    "A tiny random-init ViT (32 px, patch 8, width 32, 4 blocks) for fast tests.",
    img_size=32,
    patch_size=8,
    embed_dim=32,
    depth=4,
    num_heads=2,
)
