"""The prefix-cache fill on CPU threads (``cl.cache.map_batches``): the states of one thread, in order, without
gradients, on several Python threads at once, the torch thread count restored."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from torch.utils.data import TensorDataset

from cl.backbones import create_backbone
from cl.cache import compute_states, map_batches
from tests.cl.test_fold import frozen_effnet
from tests.helpers import TINY


def data(n: int = 37) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g), torch.arange(n) % 5)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "vit_tiny_test"])
def test_a_fill_on_threads_gives_the_serial_states_in_order(name):
    b = frozen_effnet() if name == "efficientnet_lite0" else create_backbone(name, **TINY[name]).eval()
    ds, before = data(), torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = compute_states(b, ds, 3, torch.device("cpu"), batch_size=4, taps=[0, 2])
        torch.set_num_threads(3)
        threaded = compute_states(b, ds, 3, torch.device("cpu"), batch_size=4, taps=[0, 2])
        assert torch.get_num_threads() == 3  # restored
    finally:
        torch.set_num_threads(before)
    assert torch.equal(threaded.parts[0], serial.parts[0]) and torch.equal(threaded.taps, serial.taps)
    assert torch.equal(threaded.targets, serial.targets)
    with torch.no_grad():  # and they are the prefix's outputs for the items in dataset order
        x = b.prepare(ds.tensors[0][-5:])
        assert torch.allclose(threaded.parts[0][-5:], b.forward_until(x, 3), atol=1e-5)


def test_fill_states_carry_no_graph_even_for_a_trainable_prefix():
    b = create_backbone("vit_tiny_test").eval().requires_grad_(True)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        states = compute_states(b, data(12), 2, torch.device("cpu"), batch_size=4)
    finally:
        torch.set_num_threads(before)
    assert not states.parts[0].requires_grad and states.parts[0].grad_fn is None


def test_map_batches_keeps_order_runs_threads_with_one_torch_thread_each_and_restores():
    seen: list[tuple[str, int]] = []

    def work(i: int) -> int:
        time.sleep(0.002 * ((7 * i) % 5))  # finish out of order
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return i * i

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert list(map_batches(work, range(20), workers=3)) == [i * i for i in range(20)]
        assert torch.get_num_threads() == 2
        assert {n for _, n in seen} == {1}
        assert len({name for name, _ in seen if name.startswith("cl-batches")}) > 1  # more than one worker ran
        assert seen[0][0] == threading.current_thread().name  # the first item alone, in the caller's thread

        def fail(i: int) -> int:
            if i == 5:
                raise ValueError("bad batch")
            return i

        with pytest.raises(ValueError, match="bad batch"):
            list(map_batches(fail, range(10), workers=2))
        assert torch.get_num_threads() == 2  # restored after an error too
        assert list(map_batches(work, [], workers=2)) == []
    finally:
        torch.set_num_threads(before)
