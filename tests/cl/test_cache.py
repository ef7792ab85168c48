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


def placed(backbone, by_place: bool):
    """``backbone`` whose prefix gives a row the same bits wherever it sits in a batch (each row run alone), or,
    with ``by_place``, bits that depend on the other rows of the batch (as a kernel that rounds by place would)."""
    run = backbone.forward_until

    def forward_until(x, *a, **kw):
        if by_place:
            out = run(x, *a, **kw)
            return type(out)(out.state + 1e-3 * out.state.mean(0), out.taps) if hasattr(out, "taps") else \
                out + 1e-3 * out.mean(0)
        rows = [run(x[i : i + 1], *a, **kw) for i in range(len(x))]
        if hasattr(rows[0], "taps"):
            return type(rows[0])(torch.cat([r.state for r in rows]), torch.cat([r.taps for r in rows]))
        return torch.cat(rows)

    backbone.forward_until = forward_until
    return backbone


def first_pass(b, ds, depth: int, taps: list[int], placement_free: bool | None):
    """Read ``ds`` through a ``FillingStates`` in shuffled batches of 10 (chunks of 4): the rows run before the
    first batch, the rows run in all, the batches and their rows, and the states object."""
    b, rows = counted(b)
    states = FillingStates(b, ds, depth, CPU, taps, batch_size=4, placement_free=placement_free)
    batches = states.batches(10, shuffle=True, generator=torch.Generator().manual_seed(1))
    first = next(batches)
    before = list(rows)
    got = [first, *batches]
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(1))
    return before, rows, list(zip(got, order.split(10), strict=True)), states


def assert_fill_states(got, want) -> None:
    for (state, y), index in got:
        assert torch.equal(state.state, want.parts[0][index]) and torch.equal(state.taps, want.taps[index])
        assert torch.equal(y, want.targets[index])


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
        got = read(states, 10, 1)
        check = 4  # the batch that settled how rows may be grouped (FillingStates.placement_free)
        assert sum(rows) == len(ds) + check  # every row once
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(1))
        assert_fill_states(zip(got, order.split(10), strict=True), want)
        read(cache.reader(b, ds, 3, CPU, taps=[0, 2], batch_size=4), 10, 2)  # a second pass reads what is kept
        kept = cache.get(b, ds, 3, CPU, taps=[0, 2], batch_size=4)
        assert sum(rows) == len(ds) + check and type(kept) is CachedStates
        # laid out in memory as the fill lays them (EfficientNet: channels-last), so later blocks round the same
        assert kept.parts[0].stride() == want.parts[0].stride() and kept.taps.stride() == want.taps.stride()
        assert torch.equal(kept.parts[0], want.parts[0]) and torch.equal(kept.taps, want.taps)
        assert torch.equal(kept.targets, want.targets)


def test_whole_chunks_where_told_so_the_first_batch_waits_for_the_chunks_of_its_rows():
    ds = data()
    with one_thread():
        b = backbone("efficientnet_lite0")
        want = compute_states(b, ds, 3, CPU, batch_size=4, taps=[0, 2])
        before, rows, got, states = first_pass(b, ds, 3, [0, 2], placement_free=False)
    chunks = torch.unique(got[0][1] // 4).tolist()  # the fill's chunks of 4 rows that hold the first batch
    assert len(chunks) < 10 and sorted(before) == sorted(4 if k < 9 else 1 for k in chunks)  # those, whole
    assert sum(rows) == len(ds) and states.placement_free is False
    assert_fill_states(got, want)


def test_where_a_row_gets_the_same_bits_anywhere_the_first_batch_computes_its_own_rows():
    ds = data()
    with one_thread():
        b = placed(backbone("efficientnet_lite0"), by_place=False)
        want = compute_states(b, ds, 3, CPU, batch_size=4, taps=[0, 2])
        before, rows, got, states = first_pass(b, ds, 3, [0, 2], placement_free=None)
    assert states.placement_free is True
    first = got[0][1]
    touched = torch.unique(first // 4)
    # chunks 0 and 1 and rows of both once more at other places (the check), then the batch's other rows (those of
    # the last, short chunk as that chunk) topped up to batches of 4 with unread rows
    others = first[first // 4 >= 2]
    tail, whole = others[others >= 36], others[others < 36]
    assert before == [4, 4, 4] + [4] * -(-len(whole) // 4) + [1] * len(tail)
    assert sum(before) < 4 * len(touched) and sum(rows) == len(ds) + 4  # fewer than its chunks; each row once
    assert_fill_states(got, want)
    with one_thread():
        states = FillingStates(b, ds, 3, CPU, [0, 2], batch_size=4)
        batches = states.batches(10, shuffle=True, generator=torch.Generator().manual_seed(1))
        next(batches)
        assert not states.filled[:36].all()
        next(batches)  # a later read computes at least FillingStates.ahead batches per worker: here all rows left
    assert states.filled[:36].all()


def test_where_a_row_gets_other_bits_at_another_place_a_read_computes_whole_chunks():
    """A prefix that rounds a row by its neighbours (the check fails): the states stay the ordered fill's bit for
    bit; computing rows anywhere (placement_free=True) would not give them (the test can fail)."""
    ds = data()
    with one_thread():
        b = placed(backbone("efficientnet_lite0"), by_place=True)
        want = compute_states(b, ds, 3, CPU, batch_size=4, taps=[0, 2])
        _, rows, got, states = first_pass(b, ds, 3, [0, 2], placement_free=None)
        assert states.placement_free is False and sum(rows) == len(ds) + 4
        assert_fill_states(got, want)
        _, _, forced, _ = first_pass(b, ds, 3, [0, 2], placement_free=True)
    with pytest.raises(AssertionError):
        assert_fill_states(forced, want)


def test_get_after_a_partial_pass_computes_only_the_rows_not_read(monkeypatch):
    monkeypatch.setattr(FillingStates, "ahead", 1)  # a read computes its own rows only (else the set at once here)
    ds = data()
    with one_thread():
        b = backbone("vit_tiny_test")
        want = compute_states(b, ds, 2, CPU, batch_size=4)
        b, rows = counted(b)
        cache = PrefixCache()
        batches = cache.reader(b, ds, 2, CPU, batch_size=4).batches(8, shuffle=True,
                                                                   generator=torch.Generator().manual_seed(0))
        next(batches), next(batches)  # a scan that stops after 16 rows
        assert 16 <= sum(rows) < len(ds)
        kept = cache.get(b, ds, 2, CPU, batch_size=4)
    assert sum(rows) == len(ds) + 4 and torch.equal(kept.parts[0], want.parts[0])  # and the check's batch
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
    the prefix round differently on another layout; where its kernels round a row differently at another place of
    a batch, a first pass computes the fill's chunks), and the first step waits for batches that hold its rows
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


def test_a_check_cut_short_is_taken_up_again_and_negative_rows_are_the_last_ones():
    """Interrupted inside the check (after its first chunk, or its second), the object stays usable: the next read
    checks again on what is kept, and every state is still the ordered fill's; row -1 is row n - 1."""
    ds = data(9)  # two whole chunks of 4 and a short one
    with one_thread():
        b = backbone("vit_tiny_test")
        want = compute_states(b, ds, 2, CPU, batch_size=4)
        for cut in (1, 2):
            states = FillingStates(b, ds, 2, CPU, batch_size=4)
            run, calls = states._prefix, []

            def prefix(x, run=run, calls=calls, cut=cut):
                calls.append(len(x))
                if len(calls) > cut:
                    raise KeyboardInterrupt
                return run(x)

            states._prefix = prefix
            with pytest.raises(KeyboardInterrupt):
                states.take(torch.tensor([7, 5]))
            states._prefix = run
            got, _ = states.take(torch.tensor([7, 5, -1]))
            assert states.placement_free is not None
            assert torch.equal(got, want.parts[0][torch.tensor([7, 5, 8])])
            assert torch.equal(states.complete().parts[0], want.parts[0])
