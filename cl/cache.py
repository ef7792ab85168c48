"""Prefix cache: outputs of the frozen blocks, computed once per item and reused.

While blocks ``0..depth-1`` are frozen and no augmentation needs fresh passes, their output for
an item never changes; caching it makes an epoch cost only the adapted suffix.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, TypeVar

import torch
from torch.utils.data import ConcatDataset, Dataset, Subset

from cl.backbones.base import Backbone
from cl.backbones.state import State, Tapped, pad_cat, take_rows, untapped
from cl.data import Inputs, iterate_batches, num_batches, take_batch, targets_of
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


def map_batches(fn: Callable[[T], R], items: Iterable[T], workers: int, first_alone: bool = True) -> Iterator[R]:
    """``fn`` over ``items``, in order, each call with one torch thread; with ``workers`` > 1 on that many Python
    threads at once (at most ``2 * workers`` items ahead of the consumer), the first item alone before them
    (``first_alone``), so anything ``fn`` builds lazily (the folded prefix copy) is built once. The torch thread
    count is restored after.

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
        if workers <= 1:
            yield from map(fn, items)
            return
        if first_alone:
            first = next(items, None)
            if first is None:
                return
            yield fn(first)
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


@contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """``module`` in eval mode inside the block, as it was after (switched only when it is training)."""
    was = module.training
    if was:
        module.eval()
    try:
        yield
    finally:
        if was:
            module.train()


def prefix_function(backbone: Backbone, depth: int, device: torch.device, taps: Sequence[int] = ()
                    ) -> Callable[[Inputs], State]:
    """Inputs -> their prefix state (stem + ``depth`` blocks, ``Tapped`` with ``taps``) without gradients, in
    whichever thread calls it."""

    def prefix(x: Inputs) -> State:
        with torch.no_grad():  # grad mode is per thread
            return backbone.forward_until(backbone.prepare(x, device), depth, taps)

    return prefix


def fill_workers(backbone: Backbone, device: torch.device, workers: int | None = None) -> int:
    """Python threads that compute prefix chunks at once (``map_batches``): ``workers``, or for None
    ``torch.get_num_threads()`` for images on a CPU, else 1 (a tokenizer shared by threads may refuse concurrent
    calls; a GPU runs one chunk at a time)."""
    if workers is not None:
        return workers
    return torch.get_num_threads() if device.type == "cpu" and backbone.data_config.modality == "image" else 1


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
    chunks: list[tuple[torch.Tensor, ...]] = []
    tapped: list[torch.Tensor] = []
    it = iterate_batches(dataset, batch_size)
    if progress is not None:
        it = progress(it, num_batches(dataset, batch_size), f"prefix (blocks < {depth})")
    is_tuple = False
    prefix, workers = prefix_function(backbone, depth, device, taps), fill_workers(backbone, device, workers)
    inputs = (x for x, _ in it)
    with eval_mode(backbone):
        batches = map_batches(prefix, inputs, workers) if workers > 1 else map(prefix, inputs)
        for state in batches:
            if isinstance(state, Tapped):
                tapped.append(state.taps.to("cpu", dtype))
                state = state.state
            is_tuple = isinstance(state, tuple)
            parts = state if is_tuple else (state,)
            chunks.append(tuple(p.to("cpu", dtype if p.is_floating_point() else p.dtype) for p in parts))
    parts = tuple(pad_cat([c[i] for c in chunks]) for i in range(len(chunks[0])))
    return CachedStates(parts, targets_of(dataset), is_tuple, torch.cat(tapped) if tapped else None)


class FillingStates(CachedStates):
    """The prefix states of a data set of images, computed where they are first read, as an ordered fill does.

    An ordered fill (``compute_states``) runs the rows in chunks of ``batch_size``, rows ``[k * batch_size, (k + 1) *
    batch_size)``. ``take`` (and so ``batches``) computes the rows of the batch not filled yet (on ``workers``
    threads, in eval mode, without gradients, as ``compute_states``), keeps them and returns the batch; ``complete``
    computes the rows left, in order. So a first pass over a data set (a training epoch, a shift scan, an evaluation)
    starts without waiting for a whole fill, each row is computed once, and every state is the ordered fill's bit
    for bit, however the data set is read (cached, resumed and N-process runs must not drift apart).

    How rows are grouped into batches is settled at the first computation (``placement_free``): chunks 0 and 1 are
    computed as the fill computes them, then rows of both once more in one batch of
    ``batch_size``, each at another place beside other rows. Where that batch's states equal the chunks' bit for
    bit (the kernels give a row the same bits wherever it sits in a batch of this size: EfficientNet-Lite0 and the
    test ViT on an AVX-512 CPU), a read computes its own rows, in batches of ``batch_size`` topped up with the next
    rows not filled yet; the rows of a last, shorter chunk are always computed as that chunk. Where not (on an
    earlier CPU the tiny test EfficientNet rounded 14 of 72 rows differently at another place), a read computes
    the fill's chunks that hold its rows: a shuffled first batch of ``B`` rows among ``K`` chunks waits for about
    ``K * (1 - exp(-B / K))`` of them (the default run's first batch, 128 of 12,000 images in chunks of 32, for 107
    of 375 chunks instead of 4 batches). The check costs one batch per data set.

    The buffers are allocated at the first batch, after ``keep(nbytes)`` said the cache has room for them; without
    room the whole data set is computed once, in order (``compute_states``), and read from while this object lives,
    as ``PrefixCache.get`` does. ``phase``: a context manager factory that counts the computing
    (``ctx.phase("cache_fill")``). ``placement_free``: None checks as above; False computes whole chunks only.
    """

    #: where rows may sit anywhere, a read that must compute rows computes at least this many batches per worker
    #: (the first read: its own rows only, for a quick first batch): each read waits for its slowest batch
    #: (Split-FashionMNIST's 12,000 train images read in shuffled batches of 128, 2 workers: 1 per worker 6.6 s,
    #: 16 per worker 5.7 s, whole chunks 5.7 s)
    ahead: int = 16

    def __init__(
        self, backbone: Backbone, dataset: Dataset, depth: int, device: torch.device, taps: Sequence[int] = (),
        batch_size: int = 32, dtype: torch.dtype = torch.float32, workers: int | None = None,
        keep: Callable[[int], bool] | None = None, phase: Callable[[], AbstractContextManager] | None = None,
        placement_free: bool | None = None,
    ) -> None:
        super().__init__((), targets_of(dataset), False)
        self.backbone, self.source, self.depth, self.device, self.tap_blocks = backbone, dataset, depth, device, taps
        self.batch_size, self.dtype, self.workers = batch_size, dtype, fill_workers(backbone, device, workers)
        self.filled = torch.zeros(len(self.targets), dtype=torch.bool)  # per row
        self.kept: bool | None = None  # whether the states are kept (None: decided at the first batch)
        self.placement_free = placement_free
        self._full = len(self.targets) // batch_size * batch_size  # rows of whole chunks (a shorter one follows)
        self._prefix = prefix_function(backbone, depth, device, taps)
        self._keep = keep or (lambda nbytes: True)
        self._phase = phase or nullcontext
        self._started = False
        self._whole: CachedStates | None = None  # without room: the ordered fill of the whole data set

    @property
    def done(self) -> bool:
        """Whether every row is filled and kept."""
        return bool(self.kept) and bool(self.filled.all())

    def take(self, index: torch.Tensor) -> tuple[State, torch.Tensor]:
        index = torch.as_tensor(index, dtype=torch.long)
        index = torch.where(index < 0, index + len(self.targets), index)  # row n - 1 is not row -1 of a batch
        if self.kept is not False and len(todo := torch.unique(index[~self.filled[index]])):
            self._fill(todo)
        if self.kept is False:
            return self._ordered().take(index)
        return super().take(index)

    def complete(self, progress: Callable[[Iterator, int, str], Iterator] | None = None) -> CachedStates:
        """The states of every row as a plain ``CachedStates``: the rows not read yet computed in order (when
        nothing is kept, the whole data set, as ``compute_states``)."""
        if self.kept is not False:
            groups = self._groups((~self.filled).nonzero().squeeze(1))
            blocks = [groups[s : s + 8] for s in range(0, len(groups), 8)]
            it = iter(blocks) if progress is None else progress(iter(blocks), len(blocks),
                                                                f"prefix (blocks < {self.depth})")
            for block in it:
                self._compute(block)
                if self.kept is False:
                    break
        if not self.kept:  # nothing kept (or no rows)
            return self._ordered()
        return CachedStates(self.parts, self.targets, False, self.taps)

    def _ordered(self) -> CachedStates:
        if self._whole is None:
            self._whole = compute_states(self.backbone, self.source, self.depth, self.device, self.batch_size,
                                         self.dtype, None, self.tap_blocks, self.workers)
        return self._whole

    def _fill(self, rows: torch.Tensor) -> None:
        """Compute and keep rows ``rows`` (sorted, not filled yet), settling ``placement_free`` first if open."""
        first = self.placement_free is None
        if first:
            self._check()
            rows = rows[~self.filled[rows]]
            if self.kept is False or not len(rows):
                return
        self._compute(self._groups(rows, least=0 if first else self.ahead * self.workers))

    def _check(self) -> None:
        """Settle ``placement_free`` (class docstring) on chunks 0 and 1 (the same ones in every process and after an
        interrupted check); kept."""
        size = self.batch_size
        if self._full < 2 * size:  # too few whole chunks to compare: compute whole chunks
            self.placement_free = False
            return
        chunks = [torch.arange(0, size), torch.arange(size, 2 * size)]
        # the second chunk's last rows, then the first's first: beside other rows, each row moved by k or size - k
        # places, k about size / 2 and coprime to size (17 of 32): a kernel that handles rows in blocks of a few
        # sees every row elsewhere in its block
        k = next(k for k in range(size // 2 | 1, size + 1) if math.gcd(k, size) == 1)
        moved = torch.cat([chunks[1][k:], chunks[0][:k]])
        self.placement_free = self._compute([c for c in chunks if not self.filled[c[0]]], check=moved)
        if self.placement_free is None:  # nothing kept: the whole data set is computed in order
            self.placement_free = False

    def _groups(self, rows: torch.Tensor, least: int = 0) -> list[torch.Tensor]:
        """The batches that compute ``rows`` (sorted, not filled): the fill's chunks that hold them, or where rows
        may sit anywhere, ``rows`` of whole chunks in batches of ``batch_size`` (at least ``least``, and a multiple
        of ``workers``, as far as there are rows), topped up with the next rows not filled yet, and the last, shorter
        chunk as itself."""
        size, n = self.batch_size, len(self.targets)
        if not self.placement_free:
            return [torch.arange(k * size, min(n, (k + 1) * size)) for k in torch.unique(rows // size).tolist()]
        tail = [torch.arange(self._full, n)] if bool((rows >= self._full).any()) else []
        rows = rows[rows < self._full]
        count = -(-max(len(rows), least * size) // size)
        count = -(-count // self.workers) * self.workers  # every worker busy to the end
        free = (~self.filled[: self._full]).nonzero().squeeze(1)
        more = free[~torch.isin(free, rows)][: count * size - len(rows)]
        rows = torch.cat([rows, more])  # unfilled rows of whole chunks: always a multiple of batch_size
        return [*(rows.split(size) if len(rows) else ()), *tail]

    def _compute(self, groups: list[torch.Tensor], check: torch.Tensor | None = None) -> bool | None:
        """Compute each group of rows as one batch (as the fill computes a chunk) and keep the states; with
        ``check`` (rows of ``groups`` in another order), that batch too, last, and return whether its states equal
        the kept ones bit for bit (None when nothing is kept)."""
        batches = [*groups, *([] if check is None else [check])]
        inputs = (take_batch(self.source, r)[0] for r in batches)
        same = None
        with self._phase(), eval_mode(self.backbone):
            states = map_batches(self._prefix, inputs, self.workers, first_alone=not self._started) \
                if self.workers > 1 else map(self._prefix, inputs)
            try:
                for i, (r, state) in enumerate(zip(batches, states, strict=True)):
                    self._started = True
                    if i == len(groups):
                        same = self._equal(r, state)
                    elif not self._store(r, state):
                        break
            finally:
                getattr(states, "close", lambda: None)()  # a generator left early restores the torch threads now
        return same

    def _store(self, rows: torch.Tensor, state: State) -> bool:
        """Keep the states of rows ``rows``; False when there is no room for the data set (nothing is kept)."""
        taps = state.taps if isinstance(state, Tapped) else None
        inner = untapped(state)
        if isinstance(inner, tuple):
            raise DataError("FillingStates keeps tensor states (images); tuple states (text) are filled in order "
                            "by compute_states")
        if self.kept is None:
            n = len(self.targets)
            dtype = self.dtype if inner.is_floating_point() else inner.dtype
            row = math.prod(inner.shape[1:]) * dtype.itemsize
            row += 0 if taps is None else math.prod(taps.shape[1:]) * self.dtype.itemsize
            self.kept = self._keep(n * row)
            if self.kept:
                self.parts = (_empty_rows(inner, n, dtype),)
                self.taps = None if taps is None else _empty_rows(taps, n, self.dtype)
        if self.kept:
            for got, kept in self._beside_kept(state):
                kept[rows] = got.to("cpu", kept.dtype)
            self.filled[rows] = True
        return bool(self.kept)

    def _equal(self, rows: torch.Tensor, state: State) -> bool:
        """Whether ``state`` (of rows ``rows``) equals the kept states of those rows bit for bit (False where they are
        kept narrower than computed: rounding to the kept type could hide a difference)."""
        pairs = self._beside_kept(state) if self.kept else []
        if not pairs or any(kept.dtype.itemsize < got.dtype.itemsize for got, kept in pairs):
            return False
        return all(torch.equal(got.to("cpu", kept.dtype), kept[rows]) for got, kept in pairs)

    def _beside_kept(self, state: State) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each tensor of a computed ``state`` (the state, its taps) beside the buffer that keeps it."""
        pairs = [(untapped(state), self.parts[0])]
        if isinstance(state, Tapped):
            pairs.append((state.taps, self.taps))
        return pairs


def _empty_rows(like: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """An empty ``[n, *like.shape[1:]]`` tensor laid out in memory as ``torch.cat`` lays out chunks like ``like`` in
    an ordered fill (channels-last prefix outputs stay channels-last, 1x1 maps contiguous), so the blocks after the
    prefix pick the same kernels for its rows (another layout rounds differently)."""
    joined = torch.cat([like[:1], like[:1]])
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    fmt = formats[like.dim()] if like.dim() in formats and not joined.is_contiguous() and joined.is_contiguous(
        memory_format=formats[like.dim()]) else torch.contiguous_format
    return torch.empty((n, *like.shape[1:]), dtype=dtype, memory_format=fmt)


def is_augmented(dataset: Dataset) -> bool:
    """Whether items of ``dataset`` change on every access (a dataset, or a part of a Concat/Subset, says
    ``augmented = True``): their prefix states must be computed fresh, never cached."""
    if isinstance(dataset, ConcatDataset):
        return any(is_augmented(d) for d in dataset.datasets)
    if isinstance(dataset, Subset):
        return is_augmented(dataset.dataset)
    return bool(getattr(dataset, "augmented", False))


class PrefixCache:
    """States per (backbone, dataset, depth, taps), kept while they fit in ``max_bytes``: complete ones (``get``),
    or ones filling as they are read (``reader``).

    The cache holds a reference to each backbone and dataset it keys, so an id is never reused for another one.
    """

    def __init__(self, max_bytes: int = 8 << 30) -> None:
        self.max_bytes = max_bytes
        self._store: dict[tuple[int, int, int, tuple[int, ...]], tuple[Backbone, Dataset, CachedStates]] = {}

    def get(
        self, backbone: Backbone, dataset: Dataset, depth: int, device: torch.device, taps: Sequence[int] = (),
        progress: Callable[[Iterator, int, str], Iterator] | None = None, **kw: Any,
    ) -> CachedStates:
        """The states of every item of ``dataset``: kept ones, else computed (``compute_states``, or what a
        ``FillingStates`` left, ``kw`` its arguments) and kept while they fit."""
        key = self._key(backbone, dataset, depth, taps)
        entry = self._store.pop(key, None)
        if entry is not None and not isinstance(entry[2], FillingStates):
            self._store[key] = entry
            return entry[2]
        if entry is not None:
            states = entry[2].complete(progress)
        else:
            states = compute_states(backbone, dataset, depth, device, taps=taps, progress=progress, **kw)
        if states.nbytes() + self.nbytes() <= self.max_bytes:
            self._store[key] = (backbone, dataset, states)
        return states

    def reader(
        self, backbone: Backbone, dataset: Dataset, depth: int, device: torch.device, taps: Sequence[int] = (),
        phase: Callable[[], AbstractContextManager] | None = None, **kw: Any,
    ) -> CachedStates:
        """States to read batches of ``dataset`` from without waiting for a fill: the kept ones, else for images a
        ``FillingStates`` (kept here while it has room) that computes the rows where they are first read,
        else (text: padded tuple states) ``get``'s. ``kw``: ``compute_states``'s arguments."""
        key = self._key(backbone, dataset, depth, taps)
        entry = self._store.get(key)
        if entry is not None and not (isinstance(entry[2], FillingStates) and entry[2].done):
            return entry[2]
        if entry is not None or backbone.data_config.modality != "image":
            return self.get(backbone, dataset, depth, device, taps, **kw)
        kw.pop("progress", None)
        filling = FillingStates(backbone, dataset, depth, device, taps, keep=lambda n: self._room(key, n),
                                phase=phase, **kw)
        self._store[key] = (backbone, dataset, filling)
        return filling

    def _key(self, backbone: Backbone, dataset: Dataset, depth: int, taps: Sequence[int]) -> tuple:
        if is_augmented(dataset):
            raise DataError("prefix cache: an augmented dataset changes on every access; compute its states fresh")
        return (id(backbone), id(dataset), depth, tuple(taps))

    def _room(self, key: tuple, nbytes: int) -> bool:
        """Whether ``nbytes`` more fit (a ``FillingStates`` asks at its first chunk); if not, its entry goes."""
        if nbytes + self.nbytes() <= self.max_bytes:
            return True
        self._store.pop(key, None)
        return False

    def nbytes(self) -> int:
        return sum(s.nbytes() for _, _, s in self._store.values())

    def clear(self) -> None:
        self._store.clear()
