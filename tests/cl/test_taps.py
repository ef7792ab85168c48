"""Taps: pooled block outputs from the single frozen pass, cached with the prefix states, under statistics heads."""

from __future__ import annotations

import pytest
import torch

import strategies  # noqa: F401  (registers every strategy)
from cl.agent import Agent
from cl.backbones import Backbone, create_backbone
from cl.backbones.base import TapPooler
from cl.backbones.state import Tapped, cat_states, take_rows, to_device, untapped
from cl.cache import CachedStates, PrefixCache
from cl.data import ArrayDataset
from cl.errors import ConfigError
from cl.registry import STRATEGIES
from cl.run import run
from scenarios import create_scenario
from scenarios.builders import class_incremental
from tests.helpers import SENTENCES, TINY, TINY_SCENARIO, interrupted_and_resumed, one_thread, tiny_config


def tiny(name: str) -> Backbone:
    torch.manual_seed(0)
    return create_backbone(name, **TINY[name]).eval()


def raw_batch(b: Backbone) -> torch.Tensor | list[str]:
    if b.data_config.modality == "text":
        return SENTENCES
    return torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
@pytest.mark.parametrize("name", list(TINY))
def test_taps_are_the_pooled_block_outputs_of_a_plain_forward(name: str) -> None:
    """Feature maps: global average pool; ViT tokens: token mean; text: mean over the real tokens; from one pass,
    split anywhere between the prefix state (``forward_until``) and the suffix (``forward_from_tapped``)."""
    b = tiny(name)
    x = b.prepare(raw_batch(b))
    outputs: list[torch.Tensor] = []
    hooks = [blk.register_forward_hook(lambda m, a, out: outputs.append(out[0] if isinstance(out, tuple) else out))
             for blk in b.blocks]
    embedding = b.forward_features(x)
    for h in hooks:
        h.remove()
    if b.data_config.modality == "text":
        m = x[1].unsqueeze(-1).float()
        want = [(o * m).sum(1) / m.sum(1) for o in outputs]
    elif b.block_kind == "channel":
        want = [o.mean((2, 3)) for o in outputs]
    else:
        want = [o.mean(1) for o in outputs]
    n = b.num_blocks
    every = b.tap_blocks("all")
    assert every == tuple(range(n)) and b.tap_dim(every) == sum(w.shape[1] for w in want)
    tapped = b.forward_until(x, n, every)
    assert isinstance(tapped, Tapped)
    torch.testing.assert_close(tapped.taps, torch.cat(want, 1), atol=1e-5, rtol=1e-5)
    for k in range(n + 1):
        state = b.forward_until(x, k, every[:k])
        out, later = b.forward_from_tapped(state, k, every[k:])
        got = torch.cat([state.taps, later], 1) if k else later
        torch.testing.assert_close(got, torch.cat(want, 1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out, embedding, atol=1e-5, rtol=0)
        torch.testing.assert_close(b.forward_from(state, k), embedding, atol=1e-5, rtol=0)  # taps play no part
    odd = b.forward_until(x, n, [n - 1, 0])  # any subset, in block order
    torch.testing.assert_close(odd.taps, torch.cat([want[0], want[n - 1]], 1), atol=1e-5, rtol=1e-5)


def test_tap_choices_and_their_errors() -> None:
    b = tiny("vit_tiny_test")
    assert b.tap_blocks(None) == () and b.tap_blocks([-1, 0, 0]) == (0, 3)
    with pytest.raises(ConfigError, match=r"taps \[4\] out of range .* \(valid: -4..3\)"):
        b.tap_blocks([4])
    x = b.prepare(raw_batch(b))
    with pytest.raises(ConfigError, match=r"tap blocks 0\.\.1"):
        b.forward_until(x, 2, [2])
    with pytest.raises(ConfigError, match=r"tap blocks 2\.\.3"):
        b.forward_from_tapped(b.forward_until(x, 2), 2, [1])
    with pytest.raises(ConfigError, match="taps feed a statistics head"):
        STRATEGIES.validate("aper", {"taps": "all", "head": "linear", "head_features": "adapted"})
    with pytest.raises(ConfigError, match="taps"):
        STRATEGIES.validate("simplecil", {"taps": "some"})
    for name in ("simplecil", "aper", "sema", "lae", "mos", "key_retrieval"):
        # off unless asked for; sema's "auto" taps the prefix when it routes by taps (its default)
        assert STRATEGIES.validate(name, {})["taps"] == ("auto" if name == "sema" else None)


def test_tapped_states_batch_like_any_other() -> None:
    """Rows, devices, concatenation; a cached text state is trimmed to its longest item, its taps never are."""
    hidden = torch.arange(2 * 5 * 4.0).view(2, 5, 4)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    taps = torch.arange(2 * 6.0).view(2, 6)
    s = Tapped((hidden, mask), taps)
    one = take_rows(s, torch.tensor([1]))
    assert isinstance(one, Tapped) and torch.equal(one.taps, taps[1:]) and torch.equal(one.state[0], hidden[1:])
    both = cat_states([take_rows(s, slice(0, 1)), to_device(one, "cpu")])
    assert torch.equal(both.taps, taps) and torch.equal(untapped(both)[1], mask)
    cached = CachedStates((hidden, mask), torch.tensor([0, 1]), is_tuple=True, taps=taps)
    got, _ = cached.take(torch.tensor([0]))
    assert got.state[0].shape == (1, 2, 4) and got.state[1].shape == (1, 2) and torch.equal(got.taps, taps[:1])
    assert cached.nbytes() == (hidden.numel() + taps.numel()) * 4 + mask.numel() * 8
    joined = CachedStates.cat([cached, cached])
    assert len(joined) == 4 and torch.equal(joined.taps, torch.cat([taps, taps]))


def test_the_prefix_cache_keys_taps() -> None:
    b = tiny("vit_tiny_test")
    data = ArrayDataset(torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8), [0, 1, 0, 1, 0])
    cache = PrefixCache()
    plain = cache.get(b, data, 2, torch.device("cpu"))
    tapped = cache.get(b, data, 2, torch.device("cpu"), taps=[0, 1])
    assert plain.taps is None and tapped.taps.shape == (5, b.tap_dim([0, 1]))
    assert cache.get(b, data, 2, torch.device("cpu"), taps=(0, 1)) is tapped
    torch.testing.assert_close(tapped.parts[0], plain.parts[0])


def text_stream():
    """3 experiences of 2 classes of short texts (a class word among filler words)."""
    g = torch.Generator().manual_seed(0)
    words = ["cat", "dog", "car", "boat", "rain", "sun"]
    filler = ["the", "a", "on", "big", "small", "red", "runs", "sits", "near", "home"]

    def make(per_class: int) -> ArrayDataset:
        texts, labels = [], []
        for c, w in enumerate(words):
            for _ in range(per_class):
                n = int(torch.randint(1, 7, (1,), generator=g))
                fill = [filler[int(i)] for i in torch.randint(0, len(filler), (n,), generator=g)]
                texts.append(" ".join([*fill[: n // 2], w, *fill[n // 2 :]]))
                labels.append(c)
        return ArrayDataset(texts, labels)

    return class_incremental(make(8), make(4), n_experiences=3, class_order=list(range(6)), name="text")


STREAMS = {
    "vit_tiny_test": lambda: create_scenario("synthetic", **{k: v for k, v in TINY_SCENARIO.items() if k != "name"}),
    "minilm": text_stream,
}


def learned(backbone: str, strategy: str, cache: bool, **params) -> tuple[Agent, list]:
    stream = STREAMS[backbone]()
    kw = TINY[backbone]
    agent = Agent(backbone, strategy, backbone_params=kw, device="cpu", progress=False,
                  strategy_params={**params, "cache_prefix": cache})
    with one_thread():
        for exp in stream:
            agent.learn(exp)
    return agent, stream


@pytest.mark.parametrize("backbone", list(STREAMS))
@pytest.mark.parametrize(("strategy", "params"), [
    ("simplecil", {"taps": "all", "head": "lda"}),
    ("aper", {"taps": "all", "head": "lda", "epochs": 1, "layers": [-1]}),  # the last block's taps: a frozen pass
])
def test_cache_on_and_off_see_the_same_features(backbone: str, strategy: str, params: dict) -> None:
    on, stream = learned(backbone, strategy, True, **params)
    off, _ = learned(backbone, strategy, False, **params)
    s = on.strategy
    assert s.taps == tuple(range(s.backbone.num_blocks))
    torch.testing.assert_close(on.strategy.head.sums, off.strategy.head.sums, rtol=1e-5, atol=1e-5)
    inputs = stream[0].test.inputs[:6]
    assert torch.equal(on.predict(inputs), off.predict(inputs))
    feats = s.features(s.prefix(s.backbone.prepare(inputs)))
    width = s.backbone.tap_dim(s.taps) + s.backbone.embed_dim * (2 if strategy == "aper" else 1)
    assert feats.shape == (6, width) and s.head.dim == width


@pytest.mark.parametrize("strategy", ["simplecil", "aper", "sema"])
def test_resumed_and_reloaded_runs_with_taps_match(tmp_path, strategy: str) -> None:
    params = {"taps": "all", "head": "lda"}
    if strategy != "simplecil":
        params.update(epochs=1, layers=[-1])
    if strategy == "sema":
        params.update(descriptor_epochs=1)
    with one_thread():
        whole = run(tiny_config(tmp_path / "whole", strategy, **params))
        resumed = interrupted_and_resumed(tiny_config(tmp_path / "resumed", strategy, **params))
    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"]
    assert whole["final_accuracy"] > 0.5


def test_saved_agent_with_taps_predicts_the_same(tmp_path) -> None:
    agent, stream = learned("vit_tiny_test", "lae", True, taps=[0, -1], epochs=1)
    x = stream[0].test.inputs[:8]
    agent.save(tmp_path / "agent")
    loaded = Agent.load(tmp_path / "agent", device="cpu", progress=False)
    assert loaded.strategy.taps == (0, 3) and torch.equal(loaded.predict(x), agent.predict(x))


def test_taps_beat_the_embedding_alone_on_real_digits():
    """Split digits (sklearn's 8x8 digits, 5 experiences), a random-init ViT: the last block's token mean has lost
    much of what the earlier blocks' pooled outputs still hold, and an LDA head over the taps gets it back."""
    stream = create_scenario("split_digits", n_experiences=5)

    def final_accuracy(taps: str | None) -> float:
        agent = Agent("vit_tiny_test", "simplecil", device="cpu", progress=False,
                      strategy_params={"head": "lda", "taps": taps})
        with one_thread():
            for exp in stream:
                agent.learn(exp)
            return agent.evaluate(stream)["accuracy_seen"]

    alone, tapped = final_accuracy(None), final_accuracy("all")
    assert tapped > alone + 0.04, (alone, tapped)  # measured 0.651 -> 0.744


def test_the_shipped_best_config_runs_a_tiny_version(tmp_path):
    """examples/split_fmnist_best.yaml as shipped (simplecil, taps: all, LDA), on 30 / 10 images per class."""
    from pathlib import Path

    from cl.config import read_yaml

    data = read_yaml(Path(__file__).resolve().parents[2] / "examples" / "split_fmnist_best.yaml")
    assert data["strategy"] == {"name": "simplecil", "head": "lda", "head_kw": {"shrinkage": 0.01}, "taps": "all"}
    data["scenario"] |= {"train_per_class": 30, "test_per_class": 10}
    data |= {"device": "cpu", "out": str(tmp_path / "run"), "progress": False, "loggers": []}
    with one_thread():
        metrics = run(data)
    assert len(metrics["accuracy_matrix"]) == 5 and metrics["params_trainable"] == 0
    assert metrics["final_accuracy"] > 0.5  # 10 classes from 30 images each


def test_tap_pooler_keeps_block_order_wherever_it_flushes() -> None:
    outputs = [torch.randn(2, c, 4, 4) for c in (3, 5, 7, 2)]
    expected = [o.mean((2, 3)) for o in outputs]
    for keep in (0, 40, 100, 1 << 20):  # pool each at once, in runs of a few, or all at the end
        pooler = TapPooler(lambda s: s.mean((2, 3)), keep=keep)
        for o in outputs:
            pooler.add(o)
        got = pooler.outputs()
        assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
