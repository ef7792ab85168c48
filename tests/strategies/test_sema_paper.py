"""SEMA's paper layout (``layers: all`` + ``expandable``): what grows, what stays, and the parameters it adds on
ViT-B/16 (random init, built on the meta device: no weights are allocated)."""

from __future__ import annotations

import itertools

import pytest
import torch

from cl.agent import Agent
from cl.backbones import create_backbone
from cl.config import read_yaml
from cl.errors import ConfigError
from scenarios import create_scenario
from strategies.sema import SEMA
from tests.helpers import one_thread
from tests.scenarios.test_paper import PAPER

FAST = {"epochs": 2, "descriptor_epochs": 10, "batch_size": 64}
ADAPTER, ROUTER_COLUMN, DESCRIPTOR = 25_360, 769, 197_504  # 768x16+16+16x768+768; 768+1; 768x128+128+128x768+768


def paper_sema() -> SEMA:
    """The strategy of examples/paper/cifar100_b0inc10.yaml on a random-init ViT-B/16 (meta device)."""
    cfg = read_yaml(PAPER / "cifar100_b0inc10.yaml")
    params = {k: v for k, v in cfg["strategy"].items() if k != "name"}
    assert params["layers"] == "all" and params["expandable"] == [-3, -2, -1]
    with torch.device("meta"):
        backbone = create_backbone("timm_vit", model_name="vit_base_patch16_224", pretrained=False)
        return SEMA(backbone, **params)


def test_paper_configuration_adds_the_papers_parameters_on_vit_b16():
    strat = paper_sema()
    assert list(strat.pools) == list(range(12)) and strat.expandable == (9, 10, 11)
    # the first experience: every block gets an adapter (SEMA's _scan_and_expand: every pool is empty)
    with torch.device("meta"):
        for pool in strat.pools.values():
            pool.add("e0", owner=0)
    m = strat.extra_metrics()
    assert m["params_functional"] == 12 * (ADAPTER + ROUTER_COLUMN) == 313_548
    assert m["params_descriptors"] == 3 * DESCRIPTOR == 592_512  # detection only, reported apart
    assert m["params_functional"] + m["params_descriptors"] == 906_060  # the official code's task 1 (METHODS.md)
    # a 10-task stream: each later experience may add one adapter to each of blocks 9-11, nowhere else
    counts = [m["params_functional"]]
    with torch.device("meta"):
        for t in range(1, 10):
            for layer in strat.expandable:
                strat.pools[layer].add(f"e{t}", owner=t)
                counts.append(strat.extra_metrics()["params_functional"])
    m = strat.extra_metrics()
    assert m["adapters_per_layer"] == {**{str(i): 1 for i in range(9)}, **{str(i): 10 for i in (9, 10, 11)}}
    step = ADAPTER + ROUTER_COLUMN  # each expansion: an adapter and a router column (+ a descriptor, apart)
    assert all(b - a == step for a, b in itertools.pairwise(counts))
    assert m["params_descriptors"] == (3 + 27) * DESCRIPTOR
    # the paper's 0.55-0.65 M functional parameters are 10-12 expansions in the 27 chances of a 10-task stream:
    # reuse is what keeps it there (one adapter per block per task, adapter_per_task, is 1.02 M)
    in_budget = [e for e in range(28) if 550_000 <= counts[0] + e * step <= 650_000]
    assert in_budget == [10, 11, 12]
    assert counts[-1] == 1_019_031 and not 550_000 <= counts[-1] <= 650_000


def test_only_the_expandable_blocks_grow_and_the_others_keep_their_first_adapter():
    stream = create_scenario("rotated_digits", angles=[0, 90, 180], train_per_class=40, test_per_class=10)
    params = {**FAST, "layers": "all", "expandable": [-1], "router": "descriptor"}
    with one_thread():
        agent = Agent("vit_tiny_test", "adapter_per_task", strategy_params=params, device="cpu", progress=False)
        agent.learn(stream[0])
        strat = agent.strategy
        assert list(strat.pools) == [0, 1, 2, 3] and strat.expandable == (3,)
        first = {i: {k: v.clone() for k, v in strat.pools[i].adapters["e0"].state_dict().items()} for i in range(3)}
        # the first experience trained every block's adapter (zero-initialised up-projection moved)
        assert all(any(v.abs().sum() > 0 for k, v in w.items() if "up" in k) for w in first.values())
        for exp in stream[1:]:
            agent.learn(exp)
    assert {i: len(p) for i, p in strat.pools.items()} == {0: 1, 1: 1, 2: 1, 3: 3}
    assert all(strat.pools[i].descriptors is None for i in range(3)) and len(strat.pools[3].descriptors) == 3
    for i in range(3):  # shared by every later experience, never trained again
        for k, v in strat.pools[i].adapters["e0"].state_dict().items():
            assert torch.equal(v, first[i][k]), (i, k)
    acc = agent.evaluate(stream)["accuracy"]
    assert min(acc) > 0.3  # 10 classes: every rotation is learned, none forgotten to chance


@pytest.mark.parametrize(("params", "message"), [
    ({"layers": "all", "expandable": [7]}, "must name some of the adapted blocks"),
    ({"layers": [-2, -1], "expandable": [0]}, "must name some of the adapted blocks"),
    ({"layers": "all", "expandable": [-1], "route_by": "task"}, "route_by='task'"),
])
def test_bad_expandable_blocks_say_what_to_do(params, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        Agent("vit_tiny_test", "sema", strategy_params=params, device="cpu", progress=False)
