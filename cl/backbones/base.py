"""The one interface every backbone offers: preprocessing, blocks, and a prefix/suffix split.

A backbone is ``stem -> blocks[0] -> ... -> blocks[n-1] -> pool``. Adapters go on ``blocks``;
everything before block ``k`` is the frozen prefix whose output (the *state*) can be cached:
``forward_features(x) == forward_from(forward_until(x, k), k)`` for every ``k``.
A state is a tensor, or for text a tuple ``(hidden [B, L, D], attention_mask [B, L] of 0/1)``.

*Taps*: the pooled output of a block (``pool_block``: global average pool of a feature map, (masked) token mean of
tokens), a cheap multi-layer description of an input for statistics heads. ``forward_until(x, k, taps)`` returns
the state ``Tapped`` with the taps of blocks before ``k``, from the same single pass; ``forward_from_tapped`` gives
those of the blocks after.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
from torch import nn

from cl.backbones.fold import FoldedCopies
from cl.backbones.preprocess import DataConfig, prepare_images
from cl.backbones.state import State, Tapped, untapped
from cl.errors import ConfigError, DataError

F = TypeVar("F", bound=Callable[..., Any])


#: which blocks to tap: every block, these indices (negative: from the end), or none
TapSpec = Literal["all"] | Sequence[int] | None


class TapPooler:
    """The pooled outputs of a pass's tapped blocks, in block order. The outputs are kept and pooled in one go at the
    end of the pass while they hold at most ``keep`` elements (small batches): the pooling kernels then run back to
    back rather than between the blocks' own: 13 taps of EfficientNet-Lite0 at batch 1 added 0.30-0.43 ms to its
    prefix pass so, 0.64-0.78 ms when pooled as they came (benchmarks/RESULTS.md); larger batches pool as they go."""

    def __init__(self, pool: Callable[[State], torch.Tensor], keep: int = 1 << 20) -> None:
        self.pool, self.keep = pool, keep
        self.kept: list[State] = []
        self.pooled: list[torch.Tensor] = []
        self.held = 0

    def add(self, state: State) -> None:
        """A tapped block's output."""
        self.kept.append(state)
        self.held += (state[0] if isinstance(state, tuple) else state).numel()
        if self.held > self.keep:
            self.flush()

    def flush(self) -> None:
        self.pooled.extend(map(self.pool, self.kept))
        self.kept, self.held = [], 0

    def outputs(self) -> list[torch.Tensor]:
        """Every tapped output pooled (``[B, width]`` each)."""
        self.flush()
        return self.pooled


@dataclass(frozen=True)
class InputSize:
    """A backbone entry's image side under some params (``key`` names the setting), the smallest side the model
    takes, and what sets that minimum (``why``)."""

    key: str
    size: int
    minimum: int
    why: str


def declares_min_input_size(rule: Callable[[dict[str, Any]], InputSize | None]) -> Callable[[F], F]:
    """Decorator for a backbone registry entry: ``rule(params)`` says its configured image side and minimum input
    size (None: nothing to check, e.g. the defaults). The registry checks it whenever the params are validated
    (``cl.config.resolve``, ``create_backbone``), so a too-small ``img_size`` fails before anything is built."""

    def check_params(params: dict[str, Any]) -> None:
        got = rule(params)
        if got is not None and got.size < got.minimum:
            raise ValueError(f"{got.key}={got.size} is below its minimum input size of {got.minimum} px ({got.why}); "
                             f"use {got.key} >= {got.minimum}")

    def deco(fn: F) -> F:
        fn.check_params = check_params  # type: ignore[attr-defined]
        fn.min_input_size = rule  # type: ignore[attr-defined]
        return fn

    return deco


def declares_imports(load: Callable[[], object]) -> Callable[[F], F]:
    """Decorator for a backbone registry entry: ``load()`` imports the libraries the entry builds its model with
    (timm, open_clip, transformers: seconds of a run's start-up), so a run can import them while it does something
    else (``cl.backbones.import_libraries``; ``cl.run`` loads the scenario's data meanwhile)."""

    def deco(fn: F) -> F:
        fn.load_imports = load  # type: ignore[attr-defined]
        return fn

    return deco


class Backbone(nn.Module):
    """Base class: subclasses set ``data_config``, ``embed_dim``, ``blocks`` and the three stages."""

    data_config: DataConfig
    embed_dim: int
    blocks: nn.ModuleList | nn.Sequential
    #: registry name and where the weights came from ("random init", "checkpoint PATH", ...)
    name: str = ""
    weights: str = "random init"
    #: "token" for transformer blocks ([B, L, D] states), "channel" for CNN blocks ([B, C, H, W])
    block_kind: str = "token"
    #: image batches are laid out channels-last (much faster for CNNs on CPU)
    channels_last: bool = False
    #: the smallest image side this model takes (None: not an image model); its registry entry declares the same
    #: rule for its params (``declares_min_input_size``) so configs are checked before the model is built
    min_input_size: int | None = 1

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def prepare(self, inputs: torch.Tensor | list[str], device: torch.device | str | None = None) -> State:
        """Raw batch (uint8/float images ``[B, C, H, W]`` in any size, or strings) -> model input."""
        if self.data_config.modality != "image":
            raise NotImplementedError
        return prepare_images(inputs, self.data_config, device or self.device, self.channels_last)

    def check_input(self, x: State) -> None:
        """Raise DataError unless ``x`` is a model input as ``prepare`` makes it (shapes only, no pass over data).

        Checks image batches against ``data_config.input_size``; other modalities override it."""
        if self.data_config.modality != "image":
            return
        c, h, w = self.data_config.input_size
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != (c, h, w):
            got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise DataError(
                f"{self.name or type(self).__name__} takes a prepared batch [B, {c}, {h}, {w}], got {got}: "
                "pass raw images through backbone.prepare(images) first (it resizes, matches channels, normalises)"
            )

    def forward_stem(self, x: State) -> State:
        """Model input -> state before ``blocks[0]``."""
        raise NotImplementedError

    def forward_block(self, i: int, state: State) -> State:
        """Run ``blocks[i]`` on a state (override when a block needs extra arguments)."""
        if isinstance(state, tuple):
            return (self.blocks[i](state[0]), *state[1:])
        return self.blocks[i](state)

    def forward_pool(self, state: State) -> torch.Tensor:
        """State after the last block -> embedding ``[B, embed_dim]``."""
        raise NotImplementedError

    def pool_block(self, state: State) -> torch.Tensor:
        """A block's output -> ``[B, width]``: the global average pool of a feature map ``[B, C, H, W]``, the
        token mean of ``[B, L, D]`` tokens, or the mean over the real tokens of a text state ``(hidden, mask)``."""
        state = untapped(state)
        if isinstance(state, tuple):
            hidden, mask = state[0], state[1]
            m = mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * m).sum(1) / m.sum(1).clamp_min(1)
        if self.block_kind == "channel":
            return state.mean((2, 3))
        return state.mean(1)

    def fold_frozen_batchnorm(self, stem: Sequence[nn.Module], tail: Sequence[nn.Module] = ()) -> None:
        """Let the frozen backbone run with BatchNorm folded into the convolutions (``cl.backbones.fold``): CNN
        backbones call it once built, naming the modules ``forward_stem`` runs (``stem``) and those
        ``forward_pool`` runs (``tail``). The blocks there now fold, also inside a wrapper put in a block's place
        later (an adapted block: ``prefix_runner``, ``suffix_runner``)."""
        self.__dict__["_foldable"] = (list(stem), list(self.blocks), list(tail), FoldedCopies())  # out of the tree

    def refold(self) -> None:
        """Build the folded copies again on their next use: after a change their check does not see (a plain
        attribute such as a norm's ``eps``, an in-place write through ``.data``; ``cl.backbones.fold.Snapshot``)."""
        foldable = self.__dict__.get("_foldable")
        if foldable is not None:
            foldable[3].clear()

    def prefix_runner(self, stop: int) -> Backbone:
        """What runs the stem and ``blocks[:stop]``: a copy with BatchNorm folded into the convolutions (same
        outputs up to float rounding) when this backbone folds (``fold_frozen_batchnorm``); else the backbone
        itself (``_folded``)."""
        return self._folded("prefix", stop)

    def suffix_runner(self, start: int) -> Backbone:
        """What runs ``blocks[start:]`` and ``forward_pool``: a folded copy as ``prefix_runner``'s, or the backbone
        itself."""
        return self._folded("suffix", start)

    def _folded(self, part: Literal["prefix", "suffix"], at: int) -> Backbone:
        """A copy of this backbone with BatchNorm folded into the convolutions of the prefix (the stem and
        ``blocks[:at]``) or the suffix (``blocks[at:]`` and the pool), kept while what it copies stays the same
        (``cl.backbones.fold.FoldedCopies``), when this backbone folds and each block there is its own or a wrapper
        in its place whose ``block`` is its own (an adapted block, ``cl.adapters``): the wrapper's other modules
        (the adapter pool) and the blocks of the other part are shared with the copy, not copied, so they may
        train, route and be hooked as usual. Else (no folding; a foreign block; something copied trains, is in
        train mode or hooked) the backbone itself."""
        foldable = self.__dict__.get("_foldable")
        if foldable is None:
            return self
        stem, own, tail, copies = foldable
        blocks = list(self.blocks)
        mine = range(at) if part == "prefix" else range(at, len(blocks))
        live: list[nn.Module] = []  # what the wrappers hold besides the block
        for i in mine:
            if blocks[i] is not own[i]:
                if getattr(blocks[i], "block", None) is not own[i]:
                    return self
                live.extend(m for m in blocks[i].children() if m is not own[i])
        if part == "prefix":
            depends, shared = [*stem, *blocks[:at]], [*blocks[at:], *live]
        else:
            depends, shared = [*blocks[at:], *tail], [*stem, *blocks[:at], *live]
        clone = copies.get(self, (part, at), depends, shared=shared)
        return self if clone is None else clone

    # The compositions below are shared by every backbone.
    def forward_until(self, x: State, stop: int, taps: Sequence[int] = ()) -> State:
        """Model input -> state before ``blocks[stop]`` (the frozen prefix output); with ``taps`` (block indices
        below ``stop``), that state ``Tapped`` with their pooled outputs (``pool_block``), from the same pass.
        The prefix runs through ``prefix_runner``."""
        self.check_input(x)
        if taps and not all(0 <= i < stop for i in taps):
            raise ConfigError(f"taps {list(taps)} of a prefix that stops before block {stop}: tap blocks 0..{stop - 1}")
        run = self.prefix_runner(stop)
        state = run.forward_stem(x)
        pooler = TapPooler(self.pool_block)
        for i in range(stop):
            state = run.forward_block(i, state)
            if i in taps:
                pooler.add(state)
        return Tapped(state, torch.cat(pooler.outputs(), 1)) if taps else state

    def forward_from(self, state: State, start: int) -> torch.Tensor:
        """State before ``blocks[start]`` -> embedding (the taps of a ``Tapped`` state play no part); the blocks and
        the pool run through ``suffix_runner``."""
        state = untapped(state)
        run = self.suffix_runner(start)
        for i in range(start, len(self.blocks)):
            state = run.forward_block(i, state)
        return run.forward_pool(state)

    def forward_from_tapped(self, state: State, start: int, taps: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """State before ``blocks[start]`` -> (embedding, pooled outputs ``[B, T]`` of the blocks ``taps``, all at or
        after ``start``, in block order), from one pass."""
        if not all(start <= i < self.num_blocks for i in taps):
            raise ConfigError(f"taps {list(taps)} after block {start}: tap blocks {start}..{self.num_blocks - 1}")
        state, run = untapped(state), self.suffix_runner(start)
        pooler = TapPooler(self.pool_block)
        for i in range(start, len(self.blocks)):
            state = run.forward_block(i, state)
            if i in taps:
                pooler.add(state)
        embedding, pooled = run.forward_pool(state), pooler.outputs()
        return embedding, torch.cat(pooled, 1) if pooled else embedding.new_zeros(embedding.shape[0], 0)

    def forward_features(self, x: State) -> torch.Tensor:
        """Model input -> embedding ``[B, embed_dim]`` (through ``prefix_runner``, as ``forward_until``)."""
        return self.forward_from(self.forward_until(x, self.num_blocks), self.num_blocks)

    def forward(self, x: State) -> torch.Tensor:
        return self.forward_features(x)

    def tap_blocks(self, taps: TapSpec) -> tuple[int, ...]:
        """Block indices (sorted, non-negative) of a tap choice: ``"all"``, indices (negative: from the end), or
        None (none); an index out of range raises ConfigError."""
        n = self.num_blocks
        if taps is None:
            return ()
        if isinstance(taps, str):
            if taps != "all":
                raise ConfigError(f"taps must be 'all', a list of block indices or None; got {taps!r}")
            return tuple(range(n))
        bad = [i for i in taps if not -n <= int(i) < n]
        if bad:
            raise ConfigError(f"taps {bad} out of range for {self.name or 'the backbone'} with {n} blocks "
                              f"(valid: {-n}..{n - 1})")
        return tuple(sorted({int(i) % n for i in taps}))

    def tap_dim(self, taps: Sequence[int]) -> int:
        """Width of the concatenated pooled outputs of blocks ``taps``."""
        dims = self.block_dims()
        return sum(dims[i] for i in taps)

    def block_dims(self) -> list[int]:
        """Feature width (tokens' D or channels' C) at the output of each block."""
        raise NotImplementedError

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def describe(self) -> dict[str, Any]:
        """A short summary for logs and reports."""
        return {
            "name": self.name,
            "weights": self.weights,
            "embed_dim": self.embed_dim,
            "num_blocks": self.num_blocks,
            "block_kind": self.block_kind,
            "params": sum(p.numel() for p in self.parameters()),
        }
