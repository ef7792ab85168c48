"""finetune forgets, joint does not, simplecil needs no training (tiny stream)."""

from cl.run import run
from tests.helpers import tiny_config


def test_finetune_forgets_and_joint_bounds_it(tmp_path):
    ft = run(tiny_config(tmp_path / "ft", "finetune", epochs=3, lr=3e-3))
    joint = run(tiny_config(tmp_path / "joint", "joint", epochs=3, lr=3e-3))
    assert ft["avg_forgetting"] > 0.3
    assert ft["accuracy_matrix"][0][0] > 0.7  # it did learn the first experience
    assert joint["final_accuracy"] > ft["final_accuracy"] + 0.2
    assert joint["avg_forgetting"] < ft["avg_forgetting"]


def test_simplecil_trains_nothing_and_adds_only_prototypes(tmp_path):
    m = run(tiny_config(tmp_path, "simplecil"))
    assert m["params_trainable"] == 0
    assert m["params_added_per_experience"] == [0, 0, 0]  # prototypes are buffers
    assert m["final_accuracy"] > 1 / 6


def test_simplecil_prototypes_are_class_means_of_eval_mode_features():
    """BatchNorm backbones must stay in eval mode: prototypes equal plain class means."""
    import torch

    from cl.agent import Agent
    from scenarios import create_scenario

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


def test_training_free_heads_and_baselines_run(tmp_path):
    """simplecil with LDA/RanPAC heads, ranpac, aper and adapter_per_task on the tiny stream."""
    lda = run(tiny_config(tmp_path / "lda", "simplecil", head="lda"))
    rp = run(tiny_config(tmp_path / "rp", "ranpac", proj_dim=256))
    assert lda["params_trainable"] == 0 and rp["params_trainable"] == 0
    assert lda["final_accuracy"] > 0.5 and rp["final_accuracy"] > 0.5
    aper = run(tiny_config(tmp_path / "aper", "aper", epochs=2, batch_size=64))
    assert aper["params_added_per_experience"][0] > 0 and aper["params_added_per_experience"][1:] == [0, 0]
    apt = run(tiny_config(tmp_path / "apt", "adapter_per_task", epochs=1, descriptor_epochs=2, batch_size=64))
    assert apt["adapters_per_layer"] == {"1": 3, "2": 3, "3": 3}
