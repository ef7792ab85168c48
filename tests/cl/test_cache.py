"""The prefix cache filled where it is read (``cl.cache.FillingStates``, ``PrefixCache.reader``): a first pass starts
at once and computes each row once, gives the states an ordered fill gives, leaves the rest to ``get``, keeps nothing
without room, and trains what a cache filled before training trains."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from cl.agent import Agent
from cl.backbones import create_backbone
from cl.cache import CachedStates, FillingStates, PrefixCache, compute_states
from cl.callbacks.base import Callback
from scenarios import create_scenario
from tests.cl.test_fold import frozen_effnet
from tests.helpers import TINY, TINY_SCENARIO, one_thread

CPU = torch.device("cpu")


def data(n: int = 37) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g), torch.arange(n) % 5)


def counted(backbone, rows: list[int] | None = None):
    """``backbone`` whose prefix passes note how many rows they ran (in ``rows``, per call)."""
    rows = [] if rows is None else rows
    run = backbone.forward_until

    def forward_until(x, *a, **kw):
        rows.append(len(x))
        return run(x, *a, **kw)

    backbone.forward_until = forward_until
    return backbone, rows


def backbone(name: str):
    return frozen_effnet() if name == "efficientnet_lite0" else create_backbone(name, **TINY[name]).eval()


def read(states: CachedStates, batch: int, seed: int):
    return list(states.batches(batch, shuffle=True, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("name", ["efficientnet_lite0", "vit_tiny_test"])
def test_a_first_pass_computes_each_row_where_it_reads_it_once_as_an_ordered_fill_does(name):
    ds = data()
    with one_thread():
        b = backbone(name)
        want = compute_states(b, ds, 3, CPU, batch_size=4, taps=[0, 2])
        b, rows = counted(b)
        cache = PrefixCache()
        states = cache.reader(b, ds, 3, CPU, taps=[0, 2], batch_size=4)
        assert isinstance(states, FillingStates)
        batches = states.batches(10, shuffle=True, generator=torch.Generator().manual_seed(1))
        first = next(batches)
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(1))
        chunks = torch.unique(order[:10] // 4).tolist()  # the fill's chunks of 4 rows that hold the first batch
        assert len(chunks) < 10 and sorted(rows) == sorted(4 if k < 9 else 1 for k in chunks)  # those, whole
        rest = list(batches)
        assert sum(rows) == len(ds)  # every row once
        for (state, y), index in zip([first, *rest], order.split(10), strict=True):
            assert torch.equal(state.state, want.parts[0][index]) and torch.equal(state.taps, want.taps[index])
            assert torch.equal(y, want.targets[index])
        read(cache.reader(b, ds, 3, CPU, taps=[0, 2], batch_size=4), 10, 2)  # a second pass reads what is kept
        kept = cache.get(b, ds, 3, CPU, taps=[0, 2], batch_size=4)
        assert sum(rows) == len(ds) and type(kept) is CachedStates
        # laid out in memory as the fill lays them (EfficientNet: channels-last), so later blocks round the same
        assert kept.parts[0].stride() == want.parts[0].stride() and kept.taps.stride() == want.taps.stride()
        assert torch.equal(kept.parts[0], want.parts[0]) and torch.equal(kept.taps, want.taps)
        assert torch.equal(kept.targets, want.targets)


def test_get_after_a_partial_pass_computes_only_the_rows_not_read():
    ds = data()
    with one_thread():
        b = backbone("vit_tiny_test")
        want = compute_states(b, ds, 2, CPU, batch_size=4)
        b, rows = counted(b)
        cache = PrefixCache()
        batches = cache.reader(b, ds, 2, CPU, batch_size=4).batches(8, shuffle=True,
                                                                   generator=torch.Generator().manual_seed(0))
        next(batches), next(batches)  # a scan that stops after 16 rows
        touched = torch.unique(torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:16] // 4)
        assert sum(rows) == sum(4 if k < 9 else 1 for k in touched.tolist()) < len(ds)
        kept = cache.get(b, ds, 2, CPU, batch_size=4)
    assert sum(rows) == len(ds) and torch.equal(kept.parts[0], want.parts[0])
    assert cache.get(b, ds, 2, CPU, batch_size=4) is kept and cache.nbytes() == kept.nbytes()


def test_without_room_nothing_is_kept_and_every_pass_computes_its_rows():
    ds = data(12)
    with one_thread():
        b = backbone("vit_tiny_test")
        want = compute_states(b, ds, 2, CPU, batch_size=4)
        b, rows = counted(b)
        cache = PrefixCache(max_bytes=1)
        for seed in (0, 1):
            got = read(cache.reader(b, ds, 2, CPU, batch_size=4), 5, seed)
            order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
            for (state, y), index in zip(got, order.split(5), strict=True):
                assert torch.equal(state, want.parts[0][index]) and torch.equal(y, want.targets[index])
        # each pass: the first chunk (which finds no room), then the data set once in order, as an ordered fill
        assert cache.nbytes() == 0 and sum(rows) == 2 * (4 + len(ds))
        assert torch.equal(cache.get(b, ds, 2, CPU, batch_size=4).parts[0], want.parts[0])  # computed in full


class FirstBatch(Callback):
    """The prefix rows run before the first training batch of each experience."""

    def __init__(self, rows: list[int]) -> None:
        self.rows, self.seen = rows, []

    def before_experience(self, agent, exp) -> None:
        self.start = sum(self.rows)

    def before_iteration(self, agent, iteration: int) -> None:
        if len(self.seen) < agent.strategy.experience.id + 1:
            self.seen.append(sum(self.rows) - self.start)


@pytest.mark.parametrize(("strategy", "backbone"), [("sema", "vit_tiny_test"), ("aper", "vit_tiny_test"),
                                                    ("sema", "efficientnet_lite0")])
def test_training_from_a_cache_filled_as_it_is_read_learns_what_a_filled_cache_learns(strategy, backbone):
    """The same trained values, bit for bit (EfficientNet's channels-last prefix states included: the blocks after
    the prefix round differently on another layout; its kernels round a row differently at another place of a
    chunk, so a first pass must compute the fill's chunks), and the first step waits for the chunks of its rows
    only."""
    scen = {k: v for k, v in TINY_SCENARIO.items() if k != "name"}
    stream = create_scenario("synthetic", **{**scen, "n_experiences": 2})
    params = {"epochs": 2, "batch_size": 16, **({"descriptor_epochs": 1} if strategy == "sema" else {})}
    results = []
    for fill_first in (True, False):
        rows: list[int] = []
        probe = FirstBatch(rows)
        with one_thread():
            agent = Agent(backbone, strategy, backbone_params=TINY[backbone], strategy_params=params, device="cpu",
                          progress=False, journal=False, seed=0, callbacks=[probe], eval_batch_size=4)
            counted(agent.strategy.backbone, rows)
            for exp in stream:
                if fill_first:
                    agent.strategy.states(exp.train)
                agent.learn(exp)
            accuracy = agent.evaluate(stream)
        results.append((agent.strategy.state_dict(), accuracy, probe.seen))
    (filled, acc_filled, _), (filling, acc_filling, seen) = results
    assert filled.keys() == filling.keys()
    for k in filled:
        a, b = filled[k], filling[k]
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, k
    assert acc_filled == acc_filling
    assert seen[0] < len(stream[0].train) and seen[0] % 4 == 0  # whole chunks of 4, not the data set
