"""finetune forgets, joint does not, simplecil needs no training (tiny stream). Whether each strategy learns
from its data at all: test_learning_contract.py."""

import inspect

import pytest
import torch
import torch.nn.functional as F

from cl.agent import Agent
from cl.run import run
from scenarios import create_scenario
from tests.helpers import tiny_config


def test_finetune_forgets_and_joint_bounds_it(tmp_path):
    ft = run(tiny_config(tmp_path / "ft", "finetune", epochs=3, lr=3e-3))
    joint = run(tiny_config(tmp_path / "joint", "joint", epochs=3, lr=3e-3))
    assert ft["avg_forgetting"] > 0.3
    assert ft["accuracy_matrix"][0][0] > 0.7  # it did learn the first experience
    assert joint["final_accuracy"] > ft["final_accuracy"] + 0.2
    assert joint["avg_forgetting"] < ft["avg_forgetting"]


def test_simplecil_trains_nothing_and_predicts_the_nearest_class_mean(tmp_path):
    m = run(tiny_config(tmp_path, "simplecil"))
    assert m["params_trainable"] == 0
    assert m["params_added_per_experience"] == [0, 0, 0]  # prototypes are buffers
    stream = create_scenario("synthetic", n_classes=6, n_experiences=3, train_per_class=12, test_per_class=6)
    agent = Agent("vit_tiny_test", "simplecil", device="cpu", progress=False)
    for exp in stream:
        agent.learn(exp)
    bb = agent.backbone

    def feats(inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return bb.forward_features(bb.prepare(inputs, "cpu"))

    train = torch.cat([feats(e.train.inputs) for e in stream])
    y = torch.cat([e.train.targets for e in stream])
    means = torch.stack([train[y == c].mean(0) for c in range(6)])
    x = torch.cat([e.test.inputs for e in stream])
    nearest = (F.normalize(feats(x), dim=1) @ F.normalize(means, dim=1).T).argmax(1)  # cosine to the class means
    assert torch.equal(agent.predict(x), nearest)


def test_simplecil_prototypes_are_class_means_of_eval_mode_features():
    """BatchNorm backbones must stay in eval mode: prototypes equal plain class means."""
    stream = create_scenario("synthetic", n_classes=4, n_experiences=2, train_per_class=20, test_per_class=4)
    agent = Agent("efficientnet_lite0", "simplecil", backbone_params={"weights": "none", "img_size": 32},
                  device="cpu", progress=False)
    exp = stream[0]
    agent.learn(exp)
    bb = agent.backbone.eval()
    with torch.no_grad():
        feats = bb.forward_features(bb.prepare(exp.train.inputs, "cpu"))
    for c in exp.classes:
        expected = feats[exp.train.targets == c].mean(0)
        assert torch.allclose(agent.strategy.head.prototypes[c], expected, atol=1e-4)


def test_task_incremental_evaluation_masks_to_the_task_classes(tmp_path):
    """With the task label known at test time, finetune's old tasks survive (only 2-3 classes compete)."""
    from tests.helpers import TINY_SCENARIO

    cls_cfg = tiny_config(tmp_path / "cls", "finetune", epochs=3, lr=3e-3)
    task_cfg = tiny_config(tmp_path / "task", "finetune", epochs=3, lr=3e-3)
    task_cfg["scenario"] = {**TINY_SCENARIO, "kind": "task"}
    cls_m, task_m = run(cls_cfg), run(task_cfg)
    assert task_m["final_accuracy"] > cls_m["final_accuracy"] + 0.2


@pytest.mark.parametrize("name,params", [("simplecil", {"head": "lda"}), ("ranpac", {"proj_dim": 256})])
def test_statistics_heads_learn_a_stream_as_one_batch_of_all_its_data(name, params):
    """Training-free heads over frozen features lose nothing by learning experience by experience: the final
    predictions equal those of the same head given every class at once."""
    def sized(n: int):
        return create_scenario("synthetic", n_classes=6, n_experiences=n, train_per_class=12, test_per_class=6)

    stream, joint = sized(3), sized(1)
    continual = Agent("vit_tiny_test", name, strategy_params=params, device="cpu", progress=False)
    for exp in stream:
        continual.learn(exp)
    once = Agent("vit_tiny_test", name, strategy_params=params, device="cpu", progress=False)
    once.learn(joint[0])
    assert continual.strategy.count_params()["params_trainable"] == 0
    x = torch.cat([e.test.inputs for e in stream])
    s = continual.strategy
    with torch.no_grad():
        state = s.backbone.forward_until(s.backbone.prepare(x, "cpu"), s.frozen_depth)
        a, b = s.scores(state), once.strategy.scores(state)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert torch.equal(continual.predict(x), once.predict(x))


def test_adapter_baselines_run(tmp_path):
    """aper adapts on the first experience only; adapter_per_task adds an adapter per layer per experience."""
    aper = run(tiny_config(tmp_path / "aper", "aper", epochs=2, batch_size=64))
    assert aper["params_added_per_experience"][0] > 0 and aper["params_added_per_experience"][1:] == [0, 0]
    apt = run(tiny_config(tmp_path / "apt", "adapter_per_task", epochs=1, descriptor_epochs=2, batch_size=64))
    assert apt["adapters_per_layer"] == {"1": 3, "2": 3, "3": 3}


ADAPTER_STRATEGIES = ["aper", "sema", "mos", "lae", "key_retrieval"]


@pytest.mark.parametrize("name", ADAPTER_STRATEGIES)
def test_every_adapter_strategy_takes_its_head_settings_from_one_declaration(name):
    """``head``, ``head_kw`` (``HeadChoice``) and ``head_features`` (``AdapterStrategy``) are declared once: every
    adapter strategy takes them, sizes its head by them, and refuses a linear head over concatenated features."""
    from cl.adapter_strategy import AdapterStrategy
    from cl.backbones import create_backbone
    from cl.errors import ConfigError
    from cl.heads import HeadChoice
    from cl.registry import STRATEGIES

    cls = STRATEGIES.get(name)
    assert issubclass(cls, AdapterStrategy) and issubclass(cls, HeadChoice)
    own = inspect.signature(vars(cls)["__init__"]).parameters if "__init__" in vars(cls) else {}
    for key in ("head", "head_kw", "head_features"):
        assert key not in own and key in STRATEGIES.params_model(name).model_fields
    bb = create_backbone("vit_tiny_test")
    d = bb.embed_dim
    for features, width in (("concat", 2 * d), ("adapted", d)):
        s = STRATEGIES.create(name, bb if features == "concat" else create_backbone("vit_tiny_test"),
                              head="lda", head_kw={"shrinkage": 0.5}, head_features=features)
        heads = list(s.heads.values()) if name == "lae" else [s.head]
        assert all(h.dim == width + s.tap_dim and h.shrinkage == 0.5 for h in heads)  # sema taps its prefix
    with pytest.raises(ConfigError, match="head_features"):
        STRATEGIES.create(name, create_backbone("vit_tiny_test"), head="linear", head_features="concat")
