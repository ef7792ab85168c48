"""Growing state loads by value: a strategy written as a user would, with per-class state grown by ``torch.cat`` and
no ``_load_from_state_dict`` override, saves and loads (``Agent.save``/``load``, ``cl run --resume``); a shape that
differs in more than the growing dimension is still refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cl.agent import Agent
from cl.errors import CheckpointError
from cl.loading import resize_to
from cl.registry import SCENARIOS, STRATEGIES, register_strategy
from cl.run import run
from cl.strategy import Strategy
from tests.helpers import TINY_SCENARIO, interrupted_and_resumed, one_thread, tiny_config


class CountsHead(nn.Module):
    """Per-class counts and sums of embeddings, grown as classes arrive (a user's own head, not ``cl.heads``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("counts", torch.zeros(0))
        self.register_buffer("sums", torch.zeros(0, dim))

    def grow(self, n: int) -> None:
        extra = n - len(self.counts)
        if extra > 0:
            self.counts = torch.cat([self.counts, torch.zeros(extra)])
            self.sums = torch.cat([self.sums, torch.zeros(extra, self.sums.shape[1])])

    def update(self, z: torch.Tensor, y: torch.Tensor) -> None:
        self.counts.index_add_(0, y, torch.ones(len(y)))
        self.sums.index_add_(0, y, z)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        means = self.sums / self.counts.clamp_min(1)[:, None]
        return (F.normalize(z, dim=1) @ F.normalize(means, dim=1).T).masked_fill(self.counts == 0, float("-inf"))


class GrowingCounts(Strategy):
    """Class means of frozen features, in a head whose buffers grow with the classes; plus a trained scale."""

    def __init__(self, backbone, **kw) -> None:
        super().__init__(backbone, **kw)
        self.head = CountsHead(backbone.embed_dim)
        self.register_buffer("experience_of_class", torch.zeros(0, dtype=torch.long))  # on the strategy itself

    def before_experience(self, exp) -> None:
        super().before_experience(exp)
        self.head.grow(max(exp.classes) + 1)
        grown = torch.full((max(0, max(exp.classes) + 1 - len(self.experience_of_class)),), -1)
        self.experience_of_class = torch.cat([self.experience_of_class, grown])
        self.experience_of_class[exp.classes] = exp.id

    @torch.no_grad()
    def after_experience(self, exp) -> None:
        self.update_statistics(self.head, exp.train)

    def scores(self, state) -> torch.Tensor:
        return self.head(self.features(state))


STREAM = {k: v for k, v in TINY_SCENARIO.items() if k != "name"}
NAME = "test_growing_counts"


@pytest.fixture(autouse=True)
def _registered() -> None:
    """Registered here, not at import: the learning contract lists the registry when it is collected."""
    if NAME not in STRATEGIES:
        register_strategy(NAME)(GrowingCounts)


def test_a_user_strategy_with_growing_state_saves_and_loads_with_no_override(tmp_path):
    assert "_load_from_state_dict" not in vars(GrowingCounts) and "_load_from_state_dict" not in vars(CountsHead)
    stream = SCENARIOS.create("synthetic", **STREAM)
    with one_thread():
        agent = Agent("vit_tiny_test", NAME, device="cpu", progress=False)
        for exp in stream.experiences[:2]:
            agent.learn(exp)
        agent.save(tmp_path / "agent")
        loaded = Agent.load(tmp_path / "agent", device="cpu", progress=False)
    got, want = loaded.strategy.checkpoint_state(), agent.strategy.checkpoint_state()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert want["head.counts"].shape == (max(stream[0].classes + stream[1].classes) + 1,)  # it did grow
    x = stream[1].test.inputs[:16]
    assert torch.equal(loaded.predict(x), agent.predict(x))


def test_a_user_strategy_with_growing_state_resumes_to_the_same_metrics(tmp_path):
    with one_thread():
        resumed = interrupted_and_resumed(tiny_config(tmp_path / "a", NAME))
        straight = run(tiny_config(tmp_path / "b", NAME))
    assert resumed["accuracy_matrix"] == straight["accuracy_matrix"]


def test_only_the_first_dimension_grows():
    net = nn.Linear(4, 3)
    assert resize_to(net, {"weight": torch.zeros(5, 4), "bias": torch.zeros(5)}) == ["weight", "bias"]
    assert net.weight.shape == (5, 4) and isinstance(net.weight, nn.Parameter) and net.weight.requires_grad
    assert resize_to(net, {"weight": torch.zeros(5, 8)}) == []  # another width: a different model, not growth
    with pytest.raises(RuntimeError, match="size mismatch"):
        net.load_state_dict({"weight": torch.zeros(5, 8), "bias": torch.zeros(5)})


def test_a_checkpoint_of_another_width_is_refused(tmp_path):
    stream = SCENARIOS.create("synthetic", **STREAM)
    with one_thread():
        agent = Agent("vit_tiny_test", NAME, device="cpu", progress=False)
        agent.learn(stream[0])
    state = agent.strategy.checkpoint_state()
    state["head.sums"] = torch.zeros(len(state["head.sums"]), 7)
    fresh = STRATEGIES.create(NAME, agent.backbone)
    with pytest.raises(CheckpointError, match="size mismatch"):
        fresh.load_checkpoint_state(state)
