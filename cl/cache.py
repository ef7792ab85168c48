"""Prefix cache: outputs of the frozen blocks, computed once per item and reused.

While blocks ``0..depth-1`` are frozen and no augmentation needs fresh passes, their output for
an item never changes; caching it makes an epoch cost only the adapted suffix.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch
from torch.utils.data import ConcatDataset, Dataset, Subset

from cl.backbones.base import Backbone
from cl.backbones.state import State, Tapped, pad_cat, take_rows
from cl.data import iterate_batches, num_batches, targets_of
from cl.errors import DataError


class CachedStates(Dataset):
    """Prefix states of a dataset held in memory (tensors with the batch first), with targets.

    Tuple states (text: hidden states and a 0/1 attention mask) are padded to one length;
    ``take`` trims a batch back to its longest item. ``taps`` ``[N, T]`` (``Tapped`` states) are kept beside the
    parts and never trimmed. ``derived`` holds per-item tensors computed from the states that never change either
    (e.g. ``MemoryEmbedding.pretrained_embeddings``), kept as long as the states.
    """

    def __init__(self, parts: tuple[torch.Tensor, ...], targets: torch.Tensor, is_tuple: bool,
                 taps: torch.Tensor | None = None) -> None:
        self.parts = parts
        self.targets = targets
        self.is_tuple = is_tuple
        self.taps = taps
        self.derived: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.targets)

    def nbytes(self) -> int:
        extra = () if self.taps is None else (self.taps,)
        return sum(p.numel() * p.element_size() for p in (*self.parts, *extra, *self.derived.values()))

    @staticmethod
    def cat(items: list[CachedStates]) -> CachedStates:
        """One set of states over several (e.g. the cached experiences of a joint run)."""
        parts = tuple(pad_cat([it.parts[i] for it in items]) for i in range(len(items[0].parts)))
        taps = None if items[0].taps is None else torch.cat([it.taps for it in items])
        return CachedStates(parts, torch.cat([it.targets for it in items]), items[0].is_tuple, taps)

    def take(self, index: torch.Tensor) -> tuple[State, torch.Tensor]:
        parts = take_rows(self.parts, index)
        if self.is_tuple:
            length = int(parts[1].sum(1).max().item()) if len(parts) > 1 else parts[0].shape[1]
            state: State = tuple(p[:, :length] if p.ndim >= 2 else p for p in parts)
        else:
            state = parts[0]
        if self.taps is not None:
            state = Tapped(state, self.taps[index])
        return state, self.targets[index]

    def batches(
        self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None
    ) -> Iterator[tuple[State, torch.Tensor]]:
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        for s in range(0, len(self), batch_size):
            yield self.take(order[s : s + batch_size])


T = TypeVar("T")
R = TypeVar("R")


def map_batches(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """``fn`` over ``items``, in order, each call with one torch thread; with ``workers`` > 1 on that many Python
    threads at once (at most ``2 * workers`` items ahead of the consumer), the first item alone before them, so
    anything ``fn`` builds lazily (the folded prefix copy) is built once. The torch thread count is restored after.

    On a CPU this parallelises across batches instead of inside each operator: the threads never wait for each
    other inside an operator, so a core the host slows delays its own batches only, and each batch's values are
    those of one thread, whatever ``workers`` is (``benchmarks.fill``: 6,000 images through the EfficientNet-Lite0
    prefix at 64 px on 2 cores, batches of 32 on 2 threads 4.5-5.2 s, median 4.8; of 64 with 2 torch threads in
    each operator 4.4-7.6 s, median 5.3; the states equal bit for bit).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        items = iter(items)
        first = next(items, None)
        if first is None:
            return
        yield fn(first)
        if workers <= 1:
            yield from map(fn, items)
            return
        with ThreadPoolExecutor(workers, thread_name_prefix="cl-batches") as pool:
            ahead: deque = deque()
            for item in items:
                ahead.append(pool.submit(fn, item))
                if len(ahead) >= 2 * workers:
                    yield ahead.popleft().result()
            while ahead:
                yield ahead.popleft().result()
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def compute_states(
    backbone: Backbone,
    dataset: Dataset,
    depth: int,
    device: torch.device,
    batch_size: int = 256,
    dtype: torch.dtype = torch.float32,
    progress: Callable[[Iterator, int, str], Iterator] | None = None,
    taps: Sequence[int] = (),
    workers: int | None = None,
) -> CachedStates:
    """Run the frozen prefix (stem + ``depth`` blocks) over a dataset; states kept on the CPU. ``taps``: blocks
    (below ``depth``) whose pooled outputs the states carry (``Tapped``). ``workers``: Python threads that run
    batches at once, each with one torch thread (``map_batches``; forward hooks on the backbone then run in those
    threads); None: ``torch.get_num_threads()`` for images on a CPU, else 1 (batch by batch, with the torch threads
    inside each operator)."""
    was_training = backbone.training
    backbone.eval()
    chunks: list[tuple[torch.Tensor, ...]] = []
    tapped: list[torch.Tensor] = []
    it = iterate_batches(dataset, batch_size)
    if progress is not None:
        it = progress(it, num_batches(dataset, batch_size), f"prefix (blocks < {depth})")
    is_tuple = False

    def prefix(x: torch.Tensor) -> State:
        with torch.no_grad():  # grad mode is per thread
            return backbone.forward_until(backbone.prepare(x, device), depth, taps)

    if workers is None:  # images on a CPU (a tokenizer shared by threads may refuse concurrent calls)
        workers = torch.get_num_threads() if device.type == "cpu" and backbone.data_config.modality == "image" else 1
    batches = map_batches(prefix, (x for x, _ in it), workers) if workers > 1 else (prefix(x) for x, _ in it)
    for state in batches:
        if isinstance(state, Tapped):
            tapped.append(state.taps.to("cpu", dtype))
            state = state.state
        is_tuple = isinstance(state, tuple)
        parts = state if is_tuple else (state,)
        chunks.append(tuple(p.to("cpu", dtype if p.is_floating_point() else p.dtype) for p in parts))
    backbone.train(was_training)
    parts = tuple(pad_cat([c[i] for c in chunks]) for i in range(len(chunks[0])))
    return CachedStates(parts, targets_of(dataset), is_tuple, torch.cat(tapped) if tapped else None)


def is_augmented(dataset: Dataset) -> bool:
    """Whether items of ``dataset`` change on every access (a dataset, or a part of a Concat/Subset, says
    ``augmented = True``): their prefix states must be computed fresh, never cached."""
    if isinstance(dataset, ConcatDataset):
        return any(is_augmented(d) for d in dataset.datasets)
    if isinstance(dataset, Subset):
        return is_augmented(dataset.dataset)
    return bool(getattr(dataset, "augmented", False))


class PrefixCache:
    """States per (backbone, dataset, depth, taps), kept while they fit in ``max_bytes``.

    The cache holds a reference to each backbone and dataset it keys, so an id is never reused for another one.
    """

    def __init__(self, max_bytes: int = 8 << 30) -> None:
        self.max_bytes = max_bytes
        self._store: dict[tuple[int, int, int, tuple[int, ...]], tuple[Backbone, Dataset, CachedStates]] = {}

    def get(
        self, backbone: Backbone, dataset: Dataset, depth: int, device: torch.device, taps: Sequence[int] = (), **kw
    ) -> CachedStates:
        if is_augmented(dataset):
            raise DataError("prefix cache: an augmented dataset changes on every access; compute its states fresh")
        key = (id(backbone), id(dataset), depth, tuple(taps))
        if key in self._store:
            return self._store[key][2]
        states = compute_states(backbone, dataset, depth, device, taps=taps, **kw)
        if states.nbytes() + self.nbytes() <= self.max_bytes:
            self._store[key] = (backbone, dataset, states)
        return states

    def nbytes(self) -> int:
        return sum(s.nbytes() for _, _, s in self._store.values())

    def clear(self) -> None:
        self._store.clear()
