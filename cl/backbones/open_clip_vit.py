"""The visual tower of an open_clip model (ViT towers only) as a backbone.

Args:
    model_name: the open_clip architecture, e.g. ``ViT-B-16``.
    pretrained: an open_clip pretrained tag (needs the hub or its cache; offline, give ``checkpoint``).
    checkpoint: a local weights file (a whole CLIP model or the visual tower alone) to load.
    vision_cfg: overrides of the architecture's vision config (width, layers, image_size, ...).
    embed_dim: width of the tower's output projection (None: the architecture's).
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cl.backbones.base import Backbone, InputSize, declares_imports, declares_min_input_size
from cl.backbones.checkpoint import load_strict, read_state_dict, select_prefix, strip_prefixes
from cl.backbones.preprocess import DataConfig
from cl.errors import ConfigError
from cl.registry import register_backbone

if TYPE_CHECKING:
    from open_clip.transformer import VisionTransformer


class OpenClipViT(Backbone):
    """stem = conv1 + class token + pos embed + patch dropout + ln_pre; pool = ln_post + pool + proj."""

    block_kind = "token"

    def __init__(self, visual: VisionTransformer, name: str, weights: str, data_config: DataConfig) -> None:
        super().__init__()
        if not visual.transformer.batch_first:
            raise ConfigError("open_clip towers that run sequence-first are not supported")
        self.model = visual
        self.name = name
        self.weights = weights
        self.data_config = data_config
        self.embed_dim = int(visual.output_dim if visual.proj is not None else visual.transformer.width)
        self.min_input_size = max(_pair(visual.patch_size))  # fewer pixels than a patch: no token

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.transformer.resblocks

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.model._embeds(x)  # open_clip's own stem, so every tower variant stays exact

    def forward_pool(self, state: torch.Tensor) -> torch.Tensor:
        pooled, _ = self.model._pool(state)
        return pooled @ self.model.proj if self.model.proj is not None else pooled

    def block_dims(self) -> list[int]:
        return [self.model.transformer.width] * self.num_blocks


def _pair(v: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def tower_input_size(model_name: str, vision_cfg: dict[str, Any] | None) -> InputSize | None:
    """The image side and minimum (one patch) of an open_clip tower whose ``vision_cfg`` changes either; None for
    the model's own sizes (or an unknown model, which ``build_open_clip_vit`` refuses with a suggestion)."""
    if not {"image_size", "patch_size"} & set(vision_cfg or {}):
        return None
    import open_clip

    base = (open_clip.get_model_config(model_name) or {}).get("vision_cfg")
    if base is None:
        return None
    vcfg = {**base, **(vision_cfg or {})}
    if "image_size" not in vcfg or "patch_size" not in vcfg:
        return None
    size, patch = min(_pair(vcfg["image_size"])), max(_pair(vcfg["patch_size"]))
    return InputSize("vision_cfg.image_size", size, patch, "its patch size")


def build_open_clip_vit(
    model_name: str,
    name: str,
    pretrained: str | None = None,
    checkpoint: str | None = None,
    vision_cfg: dict[str, Any] | None = None,
    embed_dim: int | None = None,
) -> OpenClipViT:
    """Build only the visual tower from open_clip's config, then load its weights (CLIP or tower-only)."""
    import open_clip
    from open_clip.model import CLIPVisionCfg, _build_vision_tower
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict
    from open_clip.transformer import VisionTransformer

    if pretrained and checkpoint:
        raise ConfigError("give either pretrained=TAG or checkpoint=PATH, not both")
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        close = difflib.get_close_matches(model_name, open_clip.list_models(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown open_clip model {model_name!r}{hint} (see open_clip.list_models())")
    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained) if pretrained else {}
    if pretrained and not tag_cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model_name)) or "none"
        raise ConfigError(f"unknown open_clip pretrained tag {pretrained!r} for {model_name} (tags: {tags})")

    vcfg = {**cfg["vision_cfg"], **(vision_cfg or {})}
    valid = CLIPVisionCfg.__dataclass_fields__
    if unknown := sorted(set(vcfg) - set(valid)):
        raise ConfigError(f"unknown vision_cfg keys {unknown} (valid: {', '.join(valid)})")
    quick_gelu = bool(cfg.get("quick_gelu", False) or tag_cfg.get("quick_gelu", False))
    visual = _build_vision_tower(embed_dim or cfg["embed_dim"], vcfg, quick_gelu=quick_gelu)
    if not isinstance(visual, VisionTransformer):
        kind = type(visual).__name__
        raise ConfigError(f"open_clip {model_name!r} has a {kind} tower; only ViT towers are supported")

    weights, path = "random init", checkpoint
    if pretrained:
        try:
            path = open_clip.download_pretrained(tag_cfg)
        except Exception as e:  # hub/URL errors differ by source; all mean "not available offline"
            raise ConfigError(
                f"could not fetch open_clip weights {model_name}/{pretrained}: no model hub is reachable and "
                f"they are not in the local cache ({type(e).__name__}: {e}). Pass checkpoint=PATH instead."
            ) from e
        weights = f"open_clip {model_name}/{pretrained}"
    if path:
        state = select_prefix(strip_prefixes(read_state_dict(path)), "visual.")
        load_strict(visual, state, f"checkpoint {path!r}")
        weights = weights if pretrained else f"checkpoint {path}"

    pp = merge_preprocess_dict(PreprocessCfg(), {**cfg.get("preprocess_cfg", {}), **tag_cfg})
    data_config = DataConfig(input_size=(3, *visual.image_size), mean=tuple(pp["mean"]), std=tuple(pp["std"]))
    return OpenClipViT(visual, name, weights, data_config)


def _import_open_clip() -> None:
    import open_clip  # noqa: F401


@register_backbone("open_clip_vit")
@declares_imports(_import_open_clip)
@declares_min_input_size(lambda p: tower_input_size(p["model_name"], p["vision_cfg"]))
def open_clip_vit(
    model_name: str = "ViT-B-16",
    pretrained: str | None = None,
    checkpoint: str | None = None,
    vision_cfg: dict[str, Any] | None = None,
    embed_dim: int | None = None,
) -> OpenClipViT:
    """The visual tower of an open_clip ViT (``pretrained`` = open_clip tag, needs the hub or its cache)."""
    return build_open_clip_vit(model_name, model_name, pretrained, checkpoint, vision_cfg, embed_dim)


@register_backbone("open_clip_tiny_test")
@declares_imports(_import_open_clip)
def open_clip_tiny_test(checkpoint: str | None = None) -> OpenClipViT:
    """A tiny random-init open_clip tower (32 px, patch 8, width 32, 3 blocks, 32-d output) for tests."""
    tiny = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 3, "head_width": 16}
    return build_open_clip_vit("ViT-B-16", "open_clip_tiny_test", None, checkpoint, tiny, 32)
