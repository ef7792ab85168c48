"""The paper-benchmark configs (examples/paper) and their scenarios, on tiny fake copies of each dataset's layout."""

from __future__ import annotations

import importlib.util
import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import ConcatDataset

from cl.config import build_config, read_yaml, resolve
from cl.errors import DataError
from cl.registry import SCENARIOS, STRATEGIES
from cl.run import run
from scenarios.sources.paper import BENCHMARKS, load_cifar100, load_cub200, pilot_class_order
from scenarios.sources.views import ImageView, random_resized_crop, resize_center_crop
from tests.helpers import one_thread

PAPER = Path(__file__).resolve().parents[2] / "examples" / "paper"
CONFIGS = sorted(PAPER.rglob("*.yaml"))
# config -> (scenario, experiences, classes per experience), as the papers split them (SEMA; MOS in mos/)
SPLITS = {
    "cifar100_b0inc10": ("cifar100", 10, 10),
    "imagenet_r_b0inc40": ("imagenet_r", 5, 40),
    "imagenet_r_b0inc20": ("imagenet_r", 10, 20),
    "imagenet_r_b0inc10": ("imagenet_r", 20, 10),
    "imagenet_a_b0inc20": ("imagenet_a", 10, 20),
    "vtab_b0inc10": ("vtab", 5, 10),
    "cub200_b0inc10": ("cub200", 20, 10),
    "objectnet_b0inc10": ("objectnet", 20, 10),
    "omnibenchmark_b0inc30": ("omnibenchmark", 10, 30),
    "mos/cifar100_b0inc5": ("cifar100", 20, 5),
    "mos/cub200_b0inc10": ("cub200", 20, 10),
    "mos/imagenet_r_b0inc20": ("imagenet_r", 10, 20),
    "mos/imagenet_a_b0inc20": ("imagenet_a", 10, 20),
    "mos/objectnet_b0inc10": ("objectnet", 20, 10),
    "mos/omnibenchmark_b0inc30": ("omnibenchmark", 10, 30),
    "mos/vtab_b0inc10": ("vtab", 5, 10),
}
TRAIN, TEST = 2, 1  # fake images per class


def key(path: Path) -> str:
    return path.relative_to(PAPER).with_suffix("").as_posix()


def png(c: int, shape: tuple[int, int] = (10, 12)) -> bytes:
    """A tiny PNG whose colour encodes class ``c``."""
    pixels = np.full((*shape, 3), (c * 37 % 256, c * 91 % 256, c * 13 % 256), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def write_pilot(root: Path, n_classes: int) -> None:
    """PILOT's layout: ROOT/{train,test}/<class>/*.png."""
    for c in range(n_classes):
        data = png(c)
        for split, n in (("train", TRAIN), ("test", TEST)):
            folder = root / split / f"n{c:05d}"
            folder.mkdir(parents=True)
            for i in range(n):
                (folder / f"{i}.png").write_bytes(data)


def write_cifar(root: Path, per_class: tuple[int, int] = (TRAIN, TEST)) -> None:
    """torchvision's cifar-100-python folder: pickled dicts with str keys, images as [N, 3072] R, G, B planes."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for split, n in zip(("train", "test"), per_class, strict=True):
        labels = np.repeat(np.arange(100), n)
        data = np.zeros((len(labels), 3, 32, 32), dtype=np.uint8)
        data[:, 0] = labels[:, None, None]  # red plane = label, green = 200
        data[:, 1] = 200
        entry = {"data": data.reshape(len(labels), -1), "fine_labels": labels.tolist()}
        (folder / split).write_bytes(pickle.dumps(entry))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"class{c}" for c in range(100)]}))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """Fake copies of every benchmark, each in its default folder name under one root."""
    root = tmp_path_factory.mktemp("paper-data")
    write_cifar(root)
    for name, b in BENCHMARKS.items():
        if name != "cifar100":
            write_pilot(root / b.folder, b.n_classes)
    return root


def scenario_params(path: Path, data_root: Path) -> tuple[str, dict]:
    """A config's scenario name and params, ``root`` moved under ``data_root``."""
    scenario = dict(read_yaml(path)["scenario"])
    name = scenario.pop("name")
    scenario["root"] = str(data_root / scenario["root"].removeprefix("data").lstrip("/"))
    return name, scenario


def test_every_paper_split_has_a_config():
    assert sorted(SPLITS) == sorted(key(p) for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=key)
def test_paper_config_resolves(path):
    data = read_yaml(path)
    assert data["scenario"]["seed"] == 1993 and data["scenario"]["augment"] is False
    assert data["backbone"]["name"] == "timm_vit" and "." in data["backbone"]["model_name"]  # weights tag pinned
    header = path.read_text().split("\nseed:")[0]
    assert "Published" in header and "Not measured here" in header and "Augmentation: OFF" in header
    strategy = data["strategy"]["name"]
    if strategy not in STRATEGIES and importlib.util.find_spec(f"strategies.{strategy}") is None:
        pytest.skip(f"strategy {strategy!r} does not exist yet")
    data["imports"] = [f"strategies.{strategy}"]  # registered even where strategies/__init__ does not import it yet
    cfg = resolve(build_config(data))
    assert cfg.scenario.name == SPLITS[key(path)][0] and cfg.scenario.params["seed"] == 1993


@pytest.mark.parametrize("path", CONFIGS, ids=key)
def test_paper_config_builds_its_split(path, data_root):
    name, params = scenario_params(path, data_root)
    scenario, n_experiences, per_experience = SPLITS[key(path)]
    stream = SCENARIOS.create(name, **params)
    assert name == scenario and stream.name == scenario and len(stream) == n_experiences
    order = pilot_class_order(BENCHMARKS[name].n_classes, 1993)
    assert [e.classes for e in stream] == [order[i : i + per_experience] for i in range(0, len(order), per_experience)]
    exp = stream[-1]
    assert len(exp.train) == TRAIN * per_experience and len(exp.test) == TEST * per_experience
    assert isinstance(exp.train, ImageView) and not exp.train.augmented and not exp.info["augmented"]
    x, y = exp.train[0]
    assert x.shape == (3, 224, 224) and x.dtype == torch.uint8 and y in exp.classes


def test_pilot_class_order_is_pilots():
    # ImageNet-R's order as PILOT's DataManager logs it (CVPR24-Ease logs/ease/imagenetr/0/20/*_1993_*.log)
    assert pilot_class_order(200, 1993)[:10] == [168, 136, 51, 9, 183, 101, 171, 99, 42, 159]
    assert pilot_class_order(5, None) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("config", ["vtab_b0inc10", "cifar100_b0inc10"])
def test_paper_config_runs_a_tiny_stream(config, data_root, tmp_path):
    """The whole stream, with the tiny random ViT in place of ViT-B/16 and one epoch."""
    path = PAPER / f"{config}.yaml"
    data = read_yaml(path)
    name, params = scenario_params(path, data_root)
    data["scenario"] = {"name": name, **params, "size": 32}
    data["backbone"] = {"name": "vit_tiny_test"}
    data["strategy"] |= {"epochs": 1, "descriptor_epochs": 2}
    data |= {"device": "cpu", "out": str(tmp_path / "run"), "progress": False, "loggers": []}
    with one_thread():
        metrics = run(data)
    n = SPLITS[config][1]
    assert len(metrics["accuracy_matrix"]) == n and len(metrics["accuracy_matrix"][-1]) == n
    assert 0.0 <= metrics["final_accuracy"] <= 1.0


def test_cifar100_reads_the_pickle_folder(data_root):
    train, test, names = load_cifar100(data_root)
    assert train.inputs.shape == (100 * TRAIN, 3, 32, 32) and len(test) == 100 * TEST and names[7] == "class7"
    x, y = train[5]
    assert x[0, 0, 0] == y and x[1, 0, 0] == 200  # planes land in the right channels
    again = load_cifar100(data_root / "cifar-100-python")  # the folder itself works too
    assert torch.equal(again[0].inputs, train.inputs)


def test_cub200_reads_the_original_release(tmp_path):
    root = tmp_path / "CUB_200_2011"
    lines, split = [], []
    for c in range(200):
        folder = root / "images" / f"{c + 1:03d}.Bird_{c}"
        folder.mkdir(parents=True)
        for i in range(3):
            (folder / f"b{i}.png").write_bytes(png(c))
            lines.append(f"{len(lines) + 1} {folder.name}/b{i}.png")
            split.append(f"{len(split) + 1} {int(i < 2)}")
    (root / "images.txt").write_text("\n".join(lines) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(split) + "\n")
    train, test, names = load_cub200(tmp_path)  # the parent of CUB_200_2011 works too
    assert (len(train), len(test), names[0]) == (400, 200, "001.Bird_0")
    stream = SCENARIOS.create("cub200", root=str(root), n_experiences=20, size=16)
    assert stream.info["layout"] == "CUB_200_2011" and [len(e.test) for e in stream] == [10] * 20
    (root / "images" / "001.Bird_0" / "b0.png").unlink()
    with pytest.raises(DataError, match=r"listed in images.txt but missing"):
        load_cub200(root)


def test_missing_or_incomplete_data_says_what_to_get(tmp_path):
    with pytest.raises(DataError, match=r"ROOT/train/<class>/\*.jpg.*200 class folders.*docs/reproduce.md"):
        SCENARIOS.create("imagenet_r", root=str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=r"cifar-100-python/\{train,test,meta\}.*cs.toronto.edu"):
        SCENARIOS.create("cifar100", root=str(tmp_path))
    with pytest.raises(DataError, match=r"CUB_200_2011 folder \(images.txt"):
        SCENARIOS.create("cub200", root=str(tmp_path))
    write_pilot(tmp_path / "vtab", 3)
    with pytest.raises(DataError, match=r"holds 3 class folders, VTAB has 50"):
        SCENARIOS.create("vtab", root=str(tmp_path / "vtab"))


def test_image_views():
    x = torch.randint(0, 256, (3, 30, 40), dtype=torch.uint8)
    assert resize_center_crop(x, 16).shape == (3, 16, 16)
    assert torch.equal(resize_center_crop(x, 16), resize_center_crop(x, 16))
    torch.manual_seed(0)
    crops = [random_resized_crop(x, 16) for _ in range(4)]
    assert all(c.shape == (3, 16, 16) and c.dtype == torch.uint8 for c in crops)
    assert not all(torch.equal(crops[0], c) for c in crops[1:])
    with pytest.raises(DataError, match="uint8 image"):
        resize_center_crop(x.float(), 16)


def test_augmented_training_data_is_never_cached(data_root):
    from cl.cache import PrefixCache, is_augmented

    stream = SCENARIOS.create("vtab", root=str(data_root / "vtab"), augment=True, size=16)
    exp = stream[0]
    assert exp.train.augmented and exp.info["augmented"] and not exp.test.augmented and stream.info["augmented"]
    assert exp.train[0][0].shape == (3, 16, 16)
    assert is_augmented(exp.train) and is_augmented(ConcatDataset([exp.test, exp.train])) and not is_augmented(exp.test)
    with pytest.raises(DataError, match="augmented dataset"):
        PrefixCache().get(None, exp.train, 1, torch.device("cpu"))
