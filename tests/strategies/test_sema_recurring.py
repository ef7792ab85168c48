"""SEMA on a stream whose domains recur (``recurring_fmnist``): recurrences reuse, new domains are told apart."""

from __future__ import annotations

import pytest
import torch

from cl.agent import Agent
from scenarios import create_scenario
from tests.scenarios.conftest import FMNIST_ROOT
from tests.strategies.test_sema import FAST, Events


@pytest.mark.skipif(not (FMNIST_ROOT / "train-images-idx3-ubyte.gz").is_file(), reason="FashionMNIST not installed")
@pytest.mark.parametrize("reuse", ["latest", "nearest"])
def test_recurring_domains_reuse_their_adapters(reuse):
    stream = create_scenario("recurring_fmnist", domains=["original", "inverted"], repeats=2, train_per_class=20,
                             test_per_class=5)
    events = Events()
    agent = Agent("vit_tiny_test", "sema", strategy_params={**FAST, "reuse": reuse}, callbacks=[events], device="cpu",
                  progress=False)
    scans: list[list[tuple[str, dict]]] = []
    params = []  # functional parameters (adapters + routers) after each experience
    for exp in stream:
        start = len(events.items)
        agent.learn(exp)
        scans.append([(k, d) for k, d in events.items[start:] if k in ("expansion", "reuse")])
        params.append(agent.strategy.extra_metrics()["params_functional"])
    assert [k for k, _ in scans[0]] == ["expansion"] * 3
    assert [k for k, _ in scans[2]] == ["reuse"] * 3  # original again, shifted a little, fresh images
    assert [k for k, _ in scans[3]] == ["reuse"] * 3  # inverted again
    grown = [d["layer"] for k, d in scans[1] if k == "expansion"]
    assert grown  # the inverted images are a new domain somewhere
    for layer in grown:  # there the inverted recurrence is nearer the inverted domain's descriptor
        z = next(d["zscores"] for _, d in scans[3] if d["layer"] == layer)
        assert z["e1"] < z["e0"]
    assert params[0] < params[1] == params[2] == params[3]  # the recurrences added nothing
    if reuse == "nearest":  # a recurrence uses, in every layer, the adapter whose descriptor fits it best
        for k in (2, 3):
            for _, d in scans[k]:
                pool = agent.strategy.pools[d["layer"]]
                nearest = min(d["zscores"], key=d["zscores"].get)
                assert pool.names[int(pool.adapter_for(torch.tensor([k]))[0])] == nearest
