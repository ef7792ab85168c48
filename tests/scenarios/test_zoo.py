from __future__ import annotations

import pytest
import torch
from PIL import Image

from cl.data import targets_of
from cl.errors import ConfigError
from scenarios import create_scenario, head_per_class, list_scenarios, load_fashion_mnist, split_digits

NAMES = ["image_folder", "recurring_fmnist", "rotated_digits", "split_digits", "split_fmnist", "split_fortunes",
         "synthetic"]


def test_list_scenarios():
    assert set(NAMES) <= set(list_scenarios())
    assert list_scenarios("split_*") == ["split_digits", "split_fmnist", "split_fortunes"]


def test_unknown_scenario_or_param_is_a_config_error():
    with pytest.raises(ConfigError, match="did you mean 'split_fmnist'"):
        create_scenario("split_fmnst")
    with pytest.raises(ConfigError, match=r"unknown key 'n_exp'.*valid keys: n_experiences, classes_per_exp"):
        create_scenario("split_digits", n_exp=3)
    with pytest.raises(ConfigError, match="key 'kind'"):
        create_scenario("split_digits", kind="domain")
    with pytest.raises(ConfigError, match="cannot be split evenly"):
        create_scenario("split_digits", n_experiences=3)


def test_split_digits_variants():
    s = create_scenario("split_digits", n_experiences=5, seed=0)
    assert s.name == "split_digits" and len(s) == 5 and s.num_classes == 10 and s.class_names[3] == "3"
    assert s.classes == split_digits(seed=0).classes != split_digits(seed=1).classes
    uneven = create_scenario("split_digits", classes_per_experience=[4, 3, 3], seed=None)
    assert [e.classes for e in uneven] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    tasks = create_scenario("split_digits", kind="task", train_per_class=5, test_per_class=2)
    assert tasks.kind == "task" and [len(e.train) for e in tasks] == [10] * 5
    assert [e.task_label for e in tasks] == list(range(5))


@pytest.mark.realdata
def test_split_fmnist(fmnist_root):
    s = create_scenario("split_fmnist", n_experiences=5)
    assert len(s) == 5 and [len(e.train) for e in s] == [12000] * 5 and [len(e.test) for e in s] == [2000] * 5
    assert s.classes == s.info["class_order"] and s.class_names[9] == "Ankle boot"
    small = create_scenario("split_fmnist", n_experiences=2, class_order=list(range(10)), train_per_class=3)
    assert [e.classes for e in small] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert [len(e.train) for e in small] == [15, 15] and len(small[0].test) == 5000
    assert small[0].train[0][0].shape == (1, 28, 28)


@pytest.mark.realdata
def test_split_fortunes(fortunes_root):
    s = create_scenario("split_fortunes", n_experiences=5)
    assert len(s) == 5 and s.num_classes % 5 == 0 and s.num_classes >= 20
    assert isinstance(s[0].train[0][0], str) and len(s.class_names) == s.num_classes
    few = create_scenario("split_fortunes", n_experiences=2, max_categories=4, test_per_class=5)
    assert set(few.class_names) == {"people", "definitions", "cookie", "computers"}
    assert [len(e.test) for e in few] == [10, 10]


def test_synthetic_is_deterministic_and_easy():
    s = create_scenario("synthetic")
    assert s.name == "synthetic" and len(s) == 3 and s.num_classes == 6
    assert s[0].train.inputs.shape == (64, 3, 16, 16) and s[0].train.inputs.dtype == torch.uint8
    assert torch.equal(s[0].train.inputs, create_scenario("synthetic")[0].train.inputs)
    train_x = torch.cat([e.train.inputs for e in s]).float().flatten(1)
    train_y = torch.cat([e.train.targets for e in s])
    test_x = torch.cat([e.test.inputs for e in s]).float().flatten(1)
    test_y = torch.cat([e.test.targets for e in s])
    centroids = torch.stack([train_x[train_y == c].mean(0) for c in range(6)])
    accuracy = (torch.cdist(test_x, centroids).argmin(1) == test_y).float().mean()
    assert accuracy > 0.95
    grey = create_scenario("synthetic", n_classes=4, n_experiences=2, channels=1, image_size=10, seed=3)
    assert grey[1].test.inputs.shape == (32, 1, 10, 10)


def test_rotated_digits_repeats_and_rotates():
    s = create_scenario("rotated_digits", angles=[0, 0, 90, 45], train_per_class=4, test_per_class=2)
    assert s.kind == "domain" and [e.domain for e in s] == ["rot0", "rot0", "rot90", "rot45"]
    assert all(e.classes == list(range(10)) for e in s) and len(s[0].train) == 40
    assert torch.equal(s[0].train.inputs, s[1].train.inputs)
    assert torch.equal(s[2].train.inputs, torch.rot90(s[0].train.inputs, 1, dims=(-2, -1)))
    assert s[3].test.inputs.shape == (20, 1, 8, 8) and s[3].test.inputs.dtype == torch.uint8
    assert torch.equal(targets_of(s[3].test), targets_of(s[0].test))


def test_recurring_fmnist_domains_return_with_small_shifts_on_fresh_images(fmnist_root):
    kw = {"domains": ["original", "inverted", "rot90"], "repeats": 2, "train_per_class": 4, "test_per_class": 2}
    s = create_scenario("recurring_fmnist", **kw)
    assert s.kind == "domain" and len(s) == 6
    assert [e.domain for e in s] == ["original", "inverted", "rot90"] * 2
    for e in s:
        assert e.classes == list(range(10)) and e.train.inputs.shape == (40, 1, 28, 28)
        assert e.train.inputs.dtype == torch.uint8
        assert torch.equal(torch.bincount(e.train.targets), torch.full((10,), 4))
        assert len(e.test) == 20 and torch.equal(torch.bincount(e.test.targets), torch.full((10,), 2))
    train, _, _ = load_fashion_mnist(fmnist_root)
    raw = [head_per_class(train, 4, start=4 * k) for k in range(6)]  # experience k: the k-th slice of each class
    assert torch.equal(s[0].train.inputs, raw[0].inputs) and torch.equal(s[1].train.inputs, 255 - raw[1].inputs)
    assert torch.equal(s[2].train.inputs, torch.rot90(raw[2].inputs, 1, dims=(-2, -1)))
    assert len({tuple(r.inputs.flatten()[:200].tolist()) for r in raw}) == 6  # fresh images every time
    shifts = s.info["shifts"]
    assert [(x["angle"], x["contrast"]) for x in shifts[:3]] == [(0.0, 1.0)] * 3  # the first round is unshifted
    for x in shifts[3:]:  # recurrences: shifted, but within the jitter
        assert 0 < abs(x["angle"]) <= 10 and x["contrast"] != 1 and abs(x["contrast"] - 1) <= 0.15

    def mean_image(e):
        return e.train.inputs.float().mean(0)

    for k in range(3, 6):  # a recurrence is nearer its own domain than any other domain of the first round
        gaps = [float((mean_image(s[k]) - mean_image(s[j])).norm()) for j in range(3)]
        assert min(range(3), key=gaps.__getitem__) == k - 3
    again = create_scenario("recurring_fmnist", **kw)
    assert again.info == s.info
    assert all(torch.equal(a.train.inputs, b.train.inputs) for a, b in zip(s, again, strict=True))
    other = create_scenario("recurring_fmnist", **kw, seed=1)
    assert other.info["shifts"][3:] != s.info["shifts"][3:]


def test_recurring_fmnist_bad_settings(fmnist_root):
    with pytest.raises(ConfigError, match="unknown domains \\['sepia'\\]"):
        create_scenario("recurring_fmnist", domains=["original", "sepia"])
    with pytest.raises(ConfigError, match="lower train_per_class or repeats"):
        create_scenario("recurring_fmnist", repeats=10, train_per_class=1000)


def test_head_per_class_start_gives_disjoint_slices(make_toy):
    data = make_toy(3, 6)
    a, b = head_per_class(data, 2), head_per_class(data, 2, start=2)
    assert torch.equal(torch.bincount(b.targets), torch.full((3,), 2))
    assert not set(a.inputs.flatten(1).sum(1).tolist()) & set(b.inputs.flatten(1).sum(1).tolist())
    assert len(head_per_class(data, 4, start=4)) == 6  # only 2 items of each class are left


def test_image_folder_scenario(tmp_path):
    for split, n in (("train", 2), ("test", 1)):
        for c in range(4):
            (tmp_path / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (5, 9), (60 * c, 0, 0)).save(tmp_path / split / f"c{c}" / f"{i}.jpg")
    s = create_scenario(
        "image_folder",
        train_root=str(tmp_path / "train"),
        test_root=str(tmp_path / "test"),
        n_experiences=2,
        size=6,
    )
    assert s.class_names == ["c0", "c1", "c2", "c3"] and [len(e.train) for e in s] == [4, 4]
    assert s[0].train[0][0].shape == (3, 6, 6)
    with pytest.raises(ConfigError, match="missing required key 'n_experiences'"):
        create_scenario("image_folder", train_root=str(tmp_path / "train"), test_root=str(tmp_path / "test"))
