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
