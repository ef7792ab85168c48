"""The bad-input survey: wrong input at every public entry point fails early with a clagent error whose
message says what was wrong and what to do, and a failed ``cl run`` leaves its run directory usable.

Cases marked ``xfail(strict=True)`` need a fix in a module owned elsewhere; the reason names it.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from rich.console import Console

from cl.agent import Agent
from cl.backbones import Backbone, create_backbone
from cl.checkpoint import load_checkpoint
from cl.cli import main
from cl.config import build_config, read_yaml, resolve
from cl.data import ArrayDataset
from cl.errors import CheckpointError, ConfigError, DataError
from cl.memory import ExperienceMemory
from cl.report import load_run
from cl.run import run
from scenarios import Experience, Stream, class_incremental, create_scenario, domain_incremental
from tests.helpers import TINY, one_thread, tiny_config

IMAGE_BACKBONES = ["vit_tiny_test", "open_clip_tiny_test", "efficientnet_lite0"]
SCENARIO = {"n_classes": 4, "n_experiences": 2, "train_per_class": 4, "test_per_class": 2, "image_size": 16}


def xfail(reason: str) -> pytest.MarkDecorator:
    return pytest.mark.xfail(strict=True, reason=reason)


def images(n: int = 2, c: int = 3, h: int = 16, w: int = 16, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    return torch.zeros(n, c, h, w, dtype=dtype)


def data(targets: list[int], c: int = 3) -> ArrayDataset:
    """Blank 16 px images with the given labels."""
    return ArrayDataset(images(len(targets), c), targets)


@functools.cache
def tiny(name: str) -> Backbone:
    return create_backbone(name, **TINY[name]).eval()


@pytest.fixture(scope="module")
def stream() -> Stream:
    return create_scenario("synthetic", **SCENARIO)


@pytest.fixture(scope="module")
def agent(stream: Stream) -> Agent:
    """A finetune agent on the tiny ViT that has learned the first experience."""
    a = Agent("vit_tiny_test", "finetune", device="cpu", progress=False)
    with one_thread():
        a.learn(stream[0])
    return a


def fresh_agent() -> Agent:
    return Agent("vit_tiny_test", "finetune", device="cpu", progress=False)


# ---- backbones: raw batches, prepared batches, modality ------------------------------------------

BAD_RAW_IMAGES = {
    "5 channels": (images(c=5), r"C = 1 or 3, got shape \(2, 5, 16, 16\)"),
    "RGBA": (images(c=4), r"drop an alpha channel with images\[:, :3\]"),
    "no batch dim": (images()[0], r"got shape \(3, 16, 16\); add the batch dimension with images\[None\] \(one "
                     r"image \[C, H, W\]\), or the channel dimension with images\[:, None\]"),
    "bool": (images(dtype=torch.bool), r"uint8 \(0-255\) or float \(0-1\) images, got dtype torch.bool"),
    "16-bit integers": (images(dtype=torch.int32) + 4000, r"integer images must lie in 0-255, got values from 4000 to "
                        r"4000: scale them to 0-255 first, or store them with ArrayDataset\(images, targets, "
                        r"value_range=\(0, 4000\)\)"),
    "floats of 0-16": (torch.linspace(0, 16, 2 * 3 * 16 * 16).reshape(2, 3, 16, 16),
                       r"float images must lie in \[0, 1\], got values from 0 to 16: divide them by their largest "
                       r"possible value \(images / 255 for 8-bit data; images / 16 if 16 is it\), or store them with "
                       r"ArrayDataset\(images, targets, value_range=\(0, 16\)\)"),
    "normalised floats": (torch.linspace(-2, 2.5, 2 * 3 * 16 * 16).reshape(2, 3, 16, 16),
                          r"got values from -2 to 2.5: they look normalised already; pass them unnormalised"),
    "NaN": (images(dtype=torch.float32).fill_(float("nan")), r"float images hold NaN or inf values"),
    "grey batch without channels": (torch.zeros(5, 16, 16, dtype=torch.uint8),
                                    r"got shape \(5, 16, 16\); add the channel dimension with images\[:, None\] "
                                    r"\(a batch of grey images \[B, H, W\]\)"),
    "one image channels last": (torch.zeros(16, 16, 3, dtype=torch.uint8), r"images.permute\(2, 0, 1\)\[None\]"),
    "channels last": (torch.zeros(2, 16, 16, 3, dtype=torch.uint8), r"channels last \[B, H, W, C\]\? use "
                      r"images.permute\(0, 3, 1, 2\)"),
    "one grey image": (torch.zeros(16, 16, dtype=torch.uint8), r"images\[None, None\]"),
    "zero height": (images(h=0), r"H, W >= 1"),
    "strings": (["a cat", "a dog"], r"got a list of strings \(text needs a text backbone, e.g. minilm\)"),
    "numpy": (images().numpy(), r"got ndarray \(convert arrays with torch.as_tensor\)"),
}


@pytest.mark.parametrize("name", IMAGE_BACKBONES)
@pytest.mark.parametrize("case", list(BAD_RAW_IMAGES))
def test_image_backbone_rejects_a_bad_raw_batch(name: str, case: str) -> None:
    bad, match = BAD_RAW_IMAGES[case]
    with pytest.raises(DataError, match=match):
        tiny(name).prepare(bad)


@pytest.mark.parametrize("name", IMAGE_BACKBONES)
@pytest.mark.parametrize("shape", [(2, 3, 48, 48), (2, 1, 32, 32), (2, 5, 32, 32)], ids=["48px", "grey", "5ch"])
@pytest.mark.parametrize("entry", ["forward_features", "forward_until"])
def test_image_backbone_rejects_an_unprepared_model_input(name: str, shape: tuple[int, ...], entry: str) -> None:
    """Model input must be what ``prepare`` makes: the configured size and channels (no torch shape error)."""
    b = tiny(name)
    call = {"forward_features": b.forward_features, "forward_until": lambda x: b.forward_until(x, 1)}[entry]
    match = rf"{name} takes a prepared batch \[B, 3, 32, 32\], got shape \({', '.join(map(str, shape))}\): " \
            r"pass raw images through backbone.prepare"
    with pytest.raises(DataError, match=match):
        call(torch.zeros(shape))


BAD_TEXT = {
    "images": (images(), r"minilm is a text backbone: it takes a list of strings, got a tensor of shape "
                         r"\(2, 3, 16, 16\) \(images need an image backbone"),
    "one string": ("one text", r"got str \(wrap one text in a list\)"),
    "no strings": ([], r"empty list of strings: give at least one text"),
    "a number": (["a cat", 3], r"got an item of type int: 3"),
}


@pytest.mark.parametrize("case", list(BAD_TEXT))
def test_text_backbone_rejects_anything_but_strings(case: str) -> None:
    bad, match = BAD_TEXT[case]
    with pytest.raises(DataError, match=match):
        tiny("minilm").prepare(bad)


def test_text_backbone_rejects_images_as_model_input() -> None:
    with pytest.raises(DataError, match=r"takes \(input_ids \[B, L\], attention_mask \[B, L\]\) from "
                                        r"backbone.prepare\(strings\), got a tensor of shape"):
        tiny("minilm").forward_features(torch.zeros(2, 3, 32, 32))


OPEN_CLIP_TINY = {"model_name": "ViT-B-16", "embed_dim": 32,
                  "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16}}
MIN_SIZES: dict[str, tuple[dict[str, Any], str, int]] = {  # entry params at a given side, the key, the minimum
    "vit_tiny_test": ({}, "img_size", 8),
    "timm_vit": ({"model_name": "vit_tiny_patch16_224", "model_kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2}},
                 "img_size", 16),
    "efficientnet_lite0": ({"weights": "none"}, "img_size", 1),
    "open_clip_vit": (OPEN_CLIP_TINY, "vision_cfg.image_size", 8),
}


def at_side(name: str, side: int) -> dict[str, Any]:
    params, key, _ = MIN_SIZES[name]
    if key == "img_size":
        return {**params, "img_size": side}
    return {**params, "vision_cfg": {**params["vision_cfg"], "image_size": side}}


@pytest.mark.parametrize("name", list(MIN_SIZES))
def test_backbone_runs_at_its_declared_minimum_input_size(name: str) -> None:
    """The declared minimum is true: the model takes an image of that side (eval mode, as clagent runs a backbone)
    and reports the same minimum once built."""
    minimum = MIN_SIZES[name][2]
    b = create_backbone(name, **at_side(name, minimum)).eval()
    assert b.min_input_size == minimum
    with torch.no_grad(), one_thread():
        assert b(b.prepare(images(h=minimum, w=minimum))).shape == (2, b.embed_dim)


@pytest.mark.parametrize("name", list(MIN_SIZES))
def test_backbone_below_its_minimum_input_size_is_refused_before_it_is_built(name: str, monkeypatch) -> None:
    _, key, minimum = MIN_SIZES[name]
    def built(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model was built to check its input size")

    monkeypatch.setattr(torch.nn.Module, "__init__", built)
    match = rf"bad value for backbone '{name}': {key}={minimum - 1} is below its minimum input size of {minimum} px"
    with pytest.raises(ConfigError, match=match):
        resolve(build_config({"backbone": {"name": name, **at_side(name, minimum - 1)}}))


def test_text_backbone_has_no_image_size() -> None:
    assert tiny("minilm").min_input_size is None


# ---- the agent and its strategy: predict, evaluate, learn ---------------------------------------

BAD_PREDICT = {
    "5 channels": (images(c=5), r"C = 1 or 3, got shape \(2, 5, 16, 16\)"),
    "no batch dim": (images()[0], r"add the batch dimension"),
    "strings to an image model": (["a cat", "a dog"], r"got a list of strings \(text needs a text backbone"),
}


@pytest.mark.parametrize("entry", ["agent", "strategy"])
@pytest.mark.parametrize("case", list(BAD_PREDICT))
def test_predict_rejects_bad_images(agent: Agent, entry: str, case: str) -> None:
    bad, match = BAD_PREDICT[case]
    predict = agent.predict if entry == "agent" else agent.strategy.predict
    with pytest.raises(DataError, match=match), one_thread():
        predict(bad)


def test_image_backbone_takes_integer_and_slightly_overshooting_float_images() -> None:
    """Any integer dtype of 0-255 reads as uint8 does; floats a little outside [0, 1] (resampling overshoot) pass."""
    backbone = tiny("vit_tiny_test")
    want = backbone.prepare(images(dtype=torch.uint8) + 200)
    assert torch.equal(backbone.prepare(images(dtype=torch.int64) + 200), want)
    assert backbone.prepare(torch.full((2, 3, 16, 16), 1.05)).shape == want.shape


def test_value_range_scales_another_scale_to_0_1() -> None:
    """ArrayDataset(value_range=...) is the explicit way to give images of another scale (docs/your-data.md)."""
    x = torch.arange(16.0).repeat(4, 1, 1, 1)  # one 0-15 row per image
    ds = ArrayDataset(x, [0, 1, 0, 1], value_range=(0, 16))
    assert ds.inputs.dtype == torch.float32 and torch.equal(ds.inputs, x / 16)
    assert torch.equal(ArrayDataset(torch.full((2, 1, 2, 2), 65535, dtype=torch.int32), [0, 1],
                                    value_range=(0, 65535)).inputs, torch.ones(2, 1, 2, 2))
    with pytest.raises(DataError, match=r"value_range=\(0, 8\) but the inputs hold values from 0 to 15"):
        ArrayDataset(x, [0, 1, 0, 1], value_range=(0, 8))
    with pytest.raises(DataError, match=r"lowest < highest"):
        ArrayDataset(x, [0, 1, 0, 1], value_range=(1, 1))
    with pytest.raises(DataError, match=r"value_range scales numeric tensors or arrays, got list"):
        ArrayDataset(["a", "b"], [0, 1], value_range=(0, 1))


def test_predict_resizes_another_image_size(agent: Agent) -> None:
    """Another size or grey images are not an error: ``prepare`` resizes and broadcasts them."""
    with one_thread():
        assert agent.predict(images(c=1, h=20, w=24)).shape == (2,)


def test_predict_of_no_inputs_is_empty(agent: Agent) -> None:
    with one_thread():
        assert agent.predict(images(n=0)).shape == (0,)


@pytest.mark.parametrize(("c", "match"), [(5, r"C = 1 or 3, got shape \(4, 5, 16, 16\)"), (4, r"alpha channel")],
                         ids=["5ch", "RGBA"])
def test_evaluate_rejects_test_images_with_wrong_channels(agent: Agent, c: int, match: str) -> None:
    exp = Experience(7, data([0, 1, 0, 1]), data([0, 1, 0, 1], c=c), [0, 1])
    with pytest.raises(DataError, match=match), one_thread():
        agent.evaluate([exp])


@pytest.mark.parametrize(
    ("train", "match"),
    [
        (data([0, 1, 0, 1], c=5), r"C = 1 or 3, got shape \(4, 5, 16, 16\)"),
        (ArrayDataset(["a", "b", "c", "d"], [0, 1, 0, 1]), r"got a list of strings"),
    ],
    ids=["5ch", "strings"],
)
def test_learn_rejects_training_data_the_backbone_cannot_read(train: ArrayDataset, match: str) -> None:
    with pytest.raises(DataError, match=match), one_thread():
        fresh_agent().learn(Experience(0, train, data([0, 1]), [0, 1]))


# ---- experiences, streams and builders ----------------------------------------------------------

BAD_EXPERIENCES: dict[str, tuple[dict[str, Any], str]] = {
    "train label outside its classes": ({"train": data([0, 1, 7])}, r"experience 0: its train set has labels \[7\] "
                                        r"that are not among its classes \[0, 1\]; add them to classes or drop those"),
    "test label outside its classes": ({"test": data([0, 1, 5])},
                                       r"its test set has labels \[5\] that are not among its classes \[0, 1\]"),
    "no train items": ({"train": data([])},
                       r"experience 0 \(classes \[0, 1\]\) has no training items: drop it or give it data"),
    "no classes": ({"classes": []}, r"experience 0 has no classes: list the class ids it holds"),
    "repeated class": ({"classes": [0, 1, 1]}, r"classes must be distinct ids >= 0, got \[0, 1, 1\] \(bad: \[1\]\)"),
    "negative class": ({"classes": [-1, 0, 1], "train": data([-1, 0, 1])},
                       r"distinct ids >= 0, got \[-1, 0, 1\] \(bad: \[-1\]\)"),
    "fractional class": ({"classes": [0, 1.5]}, r"experience 0: a class id must be an int, got 1.5"),
    "classes not a list": ({"classes": 3}, r"classes must be a list of class ids, got 3"),
    "id not an int": ({"id": "first"}, r"experience id must be an int, got 'first'"),
}


@pytest.mark.parametrize("case", list(BAD_EXPERIENCES))
def test_experience_rejects_inconsistent_data(case: str) -> None:
    changes, match = BAD_EXPERIENCES[case]
    args = {"id": 0, "train": data([0, 1]), "test": data([0, 1]), "classes": [0, 1], **changes}
    with pytest.raises(DataError, match=match):
        Experience(**args)


def experiences(*classes: list[int], ids: list[int] | None = None) -> list[Experience]:
    return [Experience(i, data(c), data(c), c) for i, c in zip(ids or range(len(classes)), classes, strict=True)]


Build = Callable[[], Any]
BAD_STREAMS: dict[str, tuple[Build, type[Exception], str]] = {
    "class in two experiences": (lambda: Stream(experiences([0, 1], [1, 2])), DataError,
                                 r"class 1 is in experience 0 and in experience 1; a class-incremental stream gives "
                                 r"each class to one experience \(use kind='domain' when classes recur\)"),
    "repeated id": (lambda: Stream(experiences([0, 1], [2, 3], ids=[0, 0])), DataError,
                    r"experience ids \[0, 0\] repeat; give each experience its own id"),
    "no experiences": (lambda: Stream([]), DataError, r"stream 'stream' has no experiences"),
    "unknown kind": (lambda: Stream(experiences([0, 1]), kind="classes"), ConfigError,
                     r"unknown stream kind 'classes' \(choose one of class, task, domain\)"),
    "not experiences": (lambda: Stream([data([0])]), DataError,
                        r"holds ArrayDataset items; it takes a list of Experience"),
}


@pytest.mark.parametrize("case", list(BAD_STREAMS))
def test_stream_rejects_an_inconsistent_list(case: str) -> None:
    build, error, match = BAD_STREAMS[case]
    with pytest.raises(error, match=match):
        build()


@pytest.mark.parametrize("kind", ["domain", "task"])
def test_recurring_classes_are_fine_outside_class_incremental_streams(kind: str) -> None:
    assert len(Stream(experiences([0, 1], [1, 2]), kind=kind)) == 2


BAD_BUILDS: dict[str, tuple[Build, type[Exception], str]] = {
    "class twice in class_order": (
        lambda: class_incremental(data([0, 1, 2, 3]), data([0, 1]), 2, class_order=[0, 1, 1, 2]), ConfigError,
        r"class_order must list each of the 4 classes \[0, 1, 2, 3\] exactly once: duplicated \[1\]; missing \[3\]"),
    "class twice in a scenario's class_order": (
        lambda: create_scenario("split_digits", class_order=[0, 0, 1, 2, 3, 4, 5, 6, 7, 8]), ConfigError,
        r"duplicated \[0\]; missing \[9\]"),
    "test class not in training": (lambda: class_incremental(data([0, 1, 2, 3]), data([0, 9]), 2), DataError,
                                   r"classes \[9\] appear in the test set but not in the training set"),
    "test class not in its domain": (
        lambda: domain_incremental([("sketch", data([0, 1]), data([0, 2]))]), DataError,
        r"classes \[2\] appear in the test set of domain 'sketch' but not in the training set"),
    "empty training set": (lambda: class_incremental(data([]), data([0, 1]), 2), DataError,
                           r"class_incremental: the training set is empty"),
    "negative label": (lambda: class_incremental(data([-1, 0, 1, 2]), data([0, 1]), 2), DataError,
                       r"classes must be distinct ids >= 0"),
    "uneven split": (lambda: class_incremental(data([0, 1, 2, 3]), data([0, 1]), 3), ConfigError,
                     r"4 classes cannot be split evenly into 3 experiences; choose a divisor of 4 or pass "
                     r"classes_per_experience=\[2, 1, 1\]"),
    "fractional labels": (lambda: ArrayDataset(images(2), [0.5, 1.0]), DataError,
                          r"targets must be integer class ids, got non-integer values such as \[0.5\]"),
    "label names": (lambda: ArrayDataset(images(2), ["cat", "dog"]), DataError,
                    r"got dtype <U3 \(map names to ids first\)"),
    "fewer labels than inputs": (lambda: ArrayDataset(images(3), [0, 1]), DataError,
                                 r"3 inputs but 2 targets: they must match"),
}


@pytest.mark.parametrize("case", list(BAD_BUILDS))
def test_builders_reject_inconsistent_data(case: str) -> None:
    build, error, match = BAD_BUILDS[case]
    with pytest.raises(error, match=match):
        build()


# ---- the experience memory ----------------------------------------------------------------------

def add(vectors: Any, **meta: Any) -> Build:
    return lambda: ExperienceMemory(dim=4).add(vectors, {"kind": "prototype", **meta})


def search(queries: Any, **kw: Any) -> Build:
    return lambda: ExperienceMemory(dim=4).search(queries, k=1, **kw)


ROW = np.zeros((1, 4), np.float32)
BAD_MEMORY_CALLS: dict[str, tuple[Build, type[Exception], str]] = {
    "add: other dim": (add(np.zeros((2, 5), np.float32)), DataError,
                       r"vectors have dimension 5, this memory holds dimension 4 \(expected \[n, 4\]\)"),
    "search: other dim": (search(np.zeros((2, 5), np.float32)), DataError,
                          r"queries have dimension 5, this memory holds dimension 4"),
    "add: 3-D": (add(np.zeros((2, 2, 4), np.float32)), DataError,
                 r"vectors must be a \[n, 4\] matrix, got shape \(2, 2, 4\)"),
    "add: NaN": (add(np.array([[0, 1, np.nan, 0]], np.float32)), DataError, r"vectors contain NaN or inf in 1 row"),
    "search: inf": (search(np.array([[np.inf, 0, 0, 0]])), DataError, r"queries contain NaN or inf in 1 row\(s\): 0"),
    "add: strings": (add(np.array([["a", "b", "c", "d"]])), DataError, r"must be real numbers \(float32 preferred\)"),
    "add: bool": (add(np.zeros((1, 4), bool)), DataError, r"must be real numbers .*got dtype bool"),
    "add: ragged": (add([[1, 2, 3, 4], [1, 2, 3]]), DataError, r"\[n, 4\] matrix of numbers; rows of unequal length"),
    "add: unknown kind": (add(ROW, kind="prototypes"), DataError,
                          r"unknown kind 'prototypes'; did you mean 'prototype'\?"),
    "add: class not an int": (add(ROW, **{"class": "cat"}), DataError, r"'class' must be an int or None"),
    "search: unknown kind": (search(ROW, kind="adapter"), ConfigError,
                             r"unknown memory kind 'adapter'; did you mean 'adapter_key'\?"),
    "search: unknown filter": (search(ROW, clas=1), ConfigError, r"unknown memory filter 'clas'; did you mean"),
    "dim 0": (lambda: ExperienceMemory(dim=0), ConfigError, r"memory dim must be a positive int, got 0"),
    "unknown metric": (lambda: ExperienceMemory(dim=4, metric="cos"), ConfigError, r"choose 'ip' or 'l2'"),
    "unknown index": (lambda: ExperienceMemory(dim=4, index="hnws"), ConfigError, r"unknown memory index 'hnws'"),
}


@pytest.mark.parametrize("case", list(BAD_MEMORY_CALLS))
def test_memory_rejects_bad_vectors_kinds_and_settings(case: str) -> None:
    build, error, match = BAD_MEMORY_CALLS[case]
    with pytest.raises(error, match=match):
        build()


def test_agent_refuses_a_memory_of_another_dimension(agent: Agent, tmp_path: Path) -> None:
    other = ExperienceMemory(dim=7)
    other.add(np.ones((1, 7), np.float32), {"kind": "task"})
    loaded = ExperienceMemory.load(other.save(tmp_path / "memory"))
    with pytest.raises(CheckpointError, match=r"holds 7-d vectors, this agent's backbone embeds to 32: it belongs "
                                              r"to another backbone"):
        agent.use_memory(loaded)
    assert agent.memory.dim == 32


# ---- configs: build_config + resolve, YAML files, the CLI ---------------------------------------

def tiny_run_config(tmp_path: Path, strategy: str = "finetune") -> dict[str, Any]:
    cfg = tiny_config(tmp_path, strategy)
    cfg["scenario"].update(SCENARIO)
    cfg["loggers"] = []
    return cfg


BAD_OVERRIDES = {
    "epochs=abc": (["strategy.epochs=abc"], r"bad value for strategy 'finetune' key 'epochs': Input should be a "
                                            r"valid integer.*\(got 'abc'\)"),
    "unknown strategy key": (["strategy.lrr=0.1"], r"unknown key 'lrr' for strategy 'finetune'; did you mean 'lr'\? "
                                                   r"\(valid keys: train_blocks, epochs, lr"),
    "unknown top key": (["sed=1"], r"unknown key 'sed' for the run config; did you mean 'seed'\?"),
    "unknown eval key": (["eval.batch=8"], r"unknown key 'eval.batch' for the run config; did you mean "
                                           r"'batch_size'\? \(valid keys: batch_size, future\)"),
    "unknown strategy": (["strategy.name=simplecl"], r"unknown strategy 'simplecl'; did you mean 'simplecil'\?"),
    "unknown backbone": (["backbone.name=vit_tiny_tset"], r"unknown backbone 'vit_tiny_tset'; did you mean "
                                                          r"'vit_tiny_test'\?"),
    "unknown scenario": (["scenario.name=synthetc"], r"unknown scenario 'synthetc'; did you mean 'synthetic'\?"),
    "strategy param type": (["strategy.name=simplecil", "strategy.head=1"],
                            r"bad value for strategy 'simplecil' key 'head': Input should be a valid string"),
    "scenario param type": (["scenario.n_classes=six"], r"bad value for scenario 'synthetic' key 'n_classes'"),
    "zero threads": (["threads=0"], r"key 'threads': Input should be greater than or equal to 1 \(got 0\)"),
    "negative cache": (["cache_max_gb=-1"], r"key 'cache_max_gb': Input should be greater than or equal to 0"),
    "device": (["device=gpu"], r"key 'device': Value error, not a device: use auto, cpu, cuda or cuda:N"),
    "no =": (["strategy.lr"], r"override 'strategy.lr' must look like key=value \(e.g. strategy.lr=0.01\)"),
    "not a section": (["seed.x=1"], r"override 'seed.x=1': 'seed' is not a section"),
    "negative seed": (["seed=-1"], r"key 'seed': Input should be greater than or equal to 0 \(got -1\)"),
    "seed past 32 bits": (["seed=4294967296"], r"key 'seed': Input should be less than or equal to 4294967295"),
    "negative scenario seed": (["scenario.seed=-1"], r"bad value for scenario 'synthetic' key 'seed': Input should be "
                                                     r"greater than or equal to 0"),
    "NaN tau": (["strategy.name=sema", "strategy.tau=.nan"],
                r"bad value for strategy 'sema' key 'tau': Input should be a finite number \(got nan\)"),
    "inf lr": (["strategy.lr=.inf"], r"bad value for strategy 'finetune' key 'lr': Input should be a finite number "
                                     r"\(got inf\)"),
    "NaN head param": (["strategy.name=ranpac", "strategy.ridge=.nan"],
                       r"key 'ridge': Input should be a finite number"),
    "inf cache": (["cache_max_gb=.inf"], r"key 'cache_max_gb': Input should be a finite number"),
    "inf interval": (["checkpoint_interval_s=.inf"],
                     r"key 'checkpoint_interval_s': Input should be a finite number"),
    "img_size below the patch": (["backbone.img_size=7"],
                                 r"bad value for backbone 'vit_tiny_test': img_size=7 is below its minimum input size "
                                 r"of 8 px \(its patch size\); use img_size >= 8"),
    "zero img_size": (["backbone.name=efficientnet_lite0", "backbone.img_size=0"],
                      r"img_size=0 is below its minimum input size of 1 px"),
}
STRATEGY_PARAM_BOUNDS = {
    "negative lr": (["strategy.lr=-0.1"], r"'lr'"),
    "negative epochs": (["strategy.epochs=-1"], r"'epochs'"),
    "zero batch size": (["strategy.batch_size=0"], r"'batch_size'"),
    "unknown optimizer": (["strategy.optimizer=adm"], r"'optimizer'"),
}


@pytest.mark.parametrize(
    "case",
    [*BAD_OVERRIDES, *STRATEGY_PARAM_BOUNDS],
)
def test_build_config_rejects_bad_values(tmp_path: Path, case: str) -> None:
    overrides, match = {**BAD_OVERRIDES, **STRATEGY_PARAM_BOUNDS}[case]
    with pytest.raises(ConfigError, match=match):
        resolve(build_config(tiny_run_config(tmp_path), overrides))


def test_a_nameless_component_section_tunes_the_default() -> None:
    """``--set strategy.epochs=...`` alone refers to the default strategy, which takes no epochs."""
    with pytest.raises(ConfigError, match=r"unknown key 'epochs' for strategy 'simplecil' \(valid keys: taps, head"):
        resolve(build_config({}, ["strategy.epochs=abc"]))


YAML_FILES: dict[str, tuple[Callable[[Path], None] | None, str]] = {
    "missing": (None, r"config file .*cfg.yaml does not exist"),
    "malformed": (lambda p: p.write_text("strategy: [unclosed\n"),
                  r"(?s)malformed YAML in \S+cfg.yaml: .*cfg.yaml\", line 1, column 11"),
    "a list": (lambda p: p.write_text("- seed\n"), r"cfg.yaml must hold a mapping of settings, got list"),
    "a directory": (lambda p: p.mkdir(), r"cfg.yaml is a directory; give the YAML file"),
    "binary": (lambda p: p.write_bytes(b"\xff\xfe\x00seed"), r"cannot read config file .*cfg.yaml as YAML text"),
}


def yaml_file(tmp_path: Path, case: str) -> Path:
    path = tmp_path / "cfg.yaml"
    write, _ = YAML_FILES[case]
    if write is not None:
        write(path)
    return path


@pytest.mark.parametrize("case", list(YAML_FILES))
def test_read_yaml_rejects_bad_files(tmp_path: Path, case: str) -> None:
    with pytest.raises(ConfigError, match=YAML_FILES[case][1]):
        read_yaml(yaml_file(tmp_path, case))


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``cl ARGV``'s exit code and stderr (argparse usage errors exit through SystemExit)."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


CLI_CASES: dict[str, tuple[list[str], str]] = {
    "epochs=abc": (["--strategy", "finetune", "--set", "strategy.epochs=abc"],
                   "bad value for strategy 'finetune' key 'epochs'"),
    "unknown strategy": (["--strategy", "simplecl"], "did you mean 'simplecil'?"),
    "unknown backbone": (["--backbone", "vit_tiny_tset"], "did you mean 'vit_tiny_test'?"),
    "unknown scenario": (["--scenario", "synthetc"], "did you mean 'synthetic'?"),
    "unknown key": (["--set", "sed=1"], "unknown key 'sed' for the run config; did you mean 'seed'?"),
    "bad device": (["--device", "gpu"], "not a device: use auto, cpu, cuda or cuda:N"),
    "seed not an int": (["--seed", "abc"], "argument --seed: invalid int value: 'abc'"),
    "negative seed": (["--seed", "-1"], "bad value for the run config key 'seed': Input should be greater than or "
                                        "equal to 0 (got -1)"),
    "img_size below the patch": (["--backbone", "vit_tiny_test", "--set", "backbone.img_size=7"],
                                 "img_size=7 is below its minimum input size of 8 px (its patch size)"),
    "NaN tau": (["--strategy", "sema", "--set", "strategy.tau=.nan"], "key 'tau': Input should be a finite number"),
    "inf lr": (["--strategy", "finetune", "--set", "strategy.lr=.inf"], "key 'lr': Input should be a finite number"),
    "no processes": (["--nproc", "0"], "--nproc must be at least 1 (got 0)"),
    "negative processes": (["--nproc", "-2"], "--nproc must be at least 1 (got -2)"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_exits_2_with_the_message_and_no_run_directory(tmp_path: Path, capsys, case: str) -> None:
    args, message = CLI_CASES[case]
    code, err = cli(["run", *args, "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and message in " ".join(err.split()) and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["missing", "malformed", "a directory", "binary"])
def test_cli_rejects_bad_yaml_files(tmp_path: Path, capsys, case: str) -> None:
    code, err = cli(["run", str(yaml_file(tmp_path, case)), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "error:" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_cli_shows_the_error_verbatim(tmp_path: Path, capsys) -> None:
    """Errors are printed as text: brackets in them are not taken for rich markup."""
    code, err = cli(["run", "--strategy", "[red]sema", "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "'[red]sema'" in err, err


# ---- run directories: a failed invocation leaves them usable ------------------------------------

QUIET = Console(file=io.StringIO())


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """A finished tiny simplecil run: its config and directory (copy it before changing anything)."""
    cfg = tiny_run_config(tmp_path_factory.mktemp("finished"), "simplecil")
    with one_thread():
        run(cfg, console=QUIET)
    return cfg, Path(cfg["out"])


@pytest.fixture
def run_copy(finished_run: tuple[dict[str, Any], Path], tmp_path: Path) -> tuple[dict[str, Any], Path]:
    """A private copy of the finished run, its config (``config.yaml`` too) pointing at the copy."""
    cfg, src = finished_run
    out = tmp_path / "run"
    shutil.copytree(src, out)
    stored = read_yaml(out / "config.yaml")
    (out / "config.yaml").write_text(yaml.safe_dump({**stored, "out": str(out)}, sort_keys=False))
    return {**cfg, "out": str(out)}, out


def snapshot(out: Path) -> dict[str, bytes]:
    """The bytes of the files a failed invocation must leave alone: config, metrics and checkpoints."""
    files = [out / "config.yaml", out / "metrics.json", *sorted((out / "checkpoints").iterdir())]
    return {str(p.relative_to(out)): p.read_bytes() for p in files}


def assert_usable(cfg: dict[str, Any], out: Path) -> None:
    """The run directory still loads: its config, its checkpoint, what ``cl report`` reads, and rerunning its
    config (which reports the finished run)."""
    assert build_config(read_yaml(out / "config.yaml")) == resolve(build_config(cfg))
    assert load_checkpoint(out / "checkpoints")["experiences_done"] == [0, 1]
    assert load_run(out).status == "finished"
    stored = json.loads((out / "metrics.json").read_text())
    with one_thread():
        assert run(cfg, console=QUIET)["final_accuracy"] == stored["final_accuracy"]


def with_strategy(cfg: dict[str, Any], **params: Any) -> dict[str, Any]:
    return {**cfg, "strategy": {**cfg["strategy"], **params}}


BAD_RUNS: dict[str, tuple[Callable[[dict[str, Any]], dict[str, Any]], str]] = {
    "unknown strategy key": (lambda c: with_strategy(c, hed="lda"), r"unknown key 'hed' for strategy 'simplecil'"),
    "unknown backbone": (lambda c: {**c, "backbone": {"name": "vit_tiny_tset"}}, r"did you mean 'vit_tiny_test'"),
    "bad scenario value": (lambda c: {**c, "scenario": {**c["scenario"], "n_classes": "six"}},
                           r"bad value for scenario 'synthetic' key 'n_classes'"),
    "unknown head": (lambda c: with_strategy(c, head="bogus"),
                     r"already holds a run with a different config; pass --resume .* --overwrite .* or --out"),
}


@pytest.mark.parametrize("case", list(BAD_RUNS))
def test_bad_config_leaves_a_finished_run_intact(run_copy, case: str) -> None:
    cfg, out = run_copy
    before = snapshot(out)
    make_bad, match = BAD_RUNS[case]
    with pytest.raises(ConfigError, match=match):
        run(make_bad(cfg), console=QUIET)
    assert snapshot(out) == before
    assert_usable(cfg, out)


FRESH_BAD_RUNS = {
    "unknown strategy key": (lambda c: with_strategy(c, hed="lda"), r"unknown key 'hed'"),
    "unknown head": (lambda c: with_strategy(c, head="bogus"), r"unknown head 'bogus' \(available: lda, linear"),
    "uneven scenario split": (lambda c: {**c, "scenario": {**c["scenario"], "n_experiences": 3}},
                              r"4 classes cannot be split evenly into 3 experiences"),
}


def listing(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for a folder): what a refused invocation must leave as it was."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("where", ["new nested folders", "an empty folder"])
@pytest.mark.parametrize("case", list(FRESH_BAD_RUNS))
def test_bad_config_leaves_no_half_made_run(tmp_path: Path, case: str, where: str) -> None:
    """A run that fails while it is built leaves nothing: not the folders it made, not its marker or lock; a folder
    that was there stays, empty."""
    cfg = tiny_run_config(tmp_path, "simplecil")
    if where == "new nested folders":
        cfg["out"] = str(tmp_path / "a" / "b" / "run")
    else:
        Path(cfg["out"]).mkdir()
    before = listing(tmp_path)
    make_bad, match = FRESH_BAD_RUNS[case]
    with pytest.raises(ConfigError, match=match), one_thread():
        run(make_bad(cfg), console=QUIET)
    assert listing(tmp_path) == before


def truncate(pt: Path) -> None:
    pt.write_bytes(pt.read_bytes()[:100])


def replace_with_foreign_file(pt: Path) -> None:
    pt.write_bytes(b"PK\x03\x04 not a checkpoint")


def edit_manifest(pt: Path, **changes: Any) -> None:
    man = pt.with_suffix(".json")
    man.write_text(json.dumps({**json.loads(man.read_text()), **changes}))


def replace_with_checksummed(pt: Path, blob: bytes) -> None:
    """A foreign payload whose manifest checksum matches, so only its content can tell."""
    pt.write_bytes(blob)
    edit_manifest(pt, sha256=hashlib.sha256(blob).hexdigest(), bytes=len(blob))


def torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated": (truncate, r"\.pt does not match its checksum in \S+\.json \(truncated or replaced"),
    "foreign file": (replace_with_foreign_file, r"\.pt does not match its checksum in \S+\.json"),
    "other format version": (lambda pt: edit_manifest(pt, format_version=99),
                             r"has format 99, this clagent reads 1 and 2 \(a newer clagent wrote it"),
    "manifest not an object": (lambda pt: pt.with_suffix(".json").write_text("[1, 2]"), r"this clagent reads 1 and 2"),
    "foreign bytes with their checksum": (lambda pt: replace_with_checksummed(pt, b"not a torch file"),
                                          r"not a clagent checkpoint"),
    "foreign torch file with its checksum": (lambda pt: replace_with_checksummed(pt, torch_bytes({"a": 1})),
                                             r"not a clagent checkpoint"),
}


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_corrupt_checkpoint_is_refused_and_the_run_stays_readable(run_copy, case: str) -> None:
    """Every kept checkpoint is damaged the same way: loading and resuming refuse with the reason and what to do,
    change nothing else, and the directory resumes again once its checkpoints are back."""
    cfg, out = run_copy
    ckpt = out / "checkpoints"
    good = {p: p.read_bytes() for p in ckpt.iterdir()}
    corrupt, match = CORRUPTIONS[case]
    for pt in ckpt.glob("*.pt"):
        corrupt(pt)
    with pytest.raises(CheckpointError, match=match) as refused:
        load_checkpoint(ckpt)
    assert "--overwrite" in str(refused.value)
    before = snapshot(out)
    with pytest.raises(CheckpointError, match=match), one_thread():
        run(cfg, resume=True, console=QUIET)
    assert snapshot(out) == before
    for path, blob in good.items():
        path.write_bytes(blob)
    assert_usable(cfg, out)


# ---- run directories: no run deletes what it did not create -------------------------------------

def config_file(tmp_path: Path, cfg: dict[str, Any], name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def not_a_run_folder(place: Path) -> None:
    (place / "sub").mkdir(parents=True)
    (place / "notes.txt").write_text("mine")
    (place / "sub" / "data.csv").write_text("1,2\n")


def a_config_and_notes(place: Path) -> None:
    """A folder holding a file named config.yaml that reads as a run config (but no checkpoint): not a run."""
    place.mkdir()
    (place / "config.yaml").write_text("seed: 3\n")
    (place / "notes.txt").write_text("mine")


OUT_NOT_A_RUN: dict[str, tuple[Callable[[Path], None], str, str]] = {  # make it, --out below it, the message
    "a folder with a file and a subfolder": (not_a_run_folder, "", "is a folder that is not a clagent run "
                                             "(no .clagent-run marker) and not empty: clagent never writes into or "
                                             "deletes such a folder; pass --out a new or empty directory"),
    "a folder with a config.yaml": (a_config_and_notes, "", "is a folder that is not a clagent run"),
    "a file": (lambda p: p.write_text("mine"), "", "is a file, not a run directory"),
    "a path through a file": (lambda p: p.write_text("mine"), "run", "place/run: Not a directory; pass --out a "
                                                                     "directory you can write"),
}


@pytest.mark.parametrize("overwrite", [False, True], ids=["", "--overwrite"])
@pytest.mark.parametrize("case", list(OUT_NOT_A_RUN))
def test_cli_never_writes_into_or_deletes_what_is_not_a_run(tmp_path: Path, capsys, case: str,
                                                             overwrite: bool) -> None:
    make, below, message = OUT_NOT_A_RUN[case]
    make(tmp_path / "place")
    cfg = config_file(tmp_path, tiny_run_config(tmp_path, "simplecil"))
    before = listing(tmp_path)
    out = tmp_path / "place" / below if below else tmp_path / "place"
    code, err = cli(["run", str(cfg), "--out", str(out), *(["--overwrite"] if overwrite else [])], capsys)
    assert code == 2 and message in " ".join(err.split()) and "Traceback" not in err, err
    assert listing(tmp_path) == before


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs sysfs, where no directory can be made")
def test_cli_refuses_an_out_it_cannot_create(tmp_path: Path, capsys) -> None:
    out = Path("/sys/clagent-test-run/run")
    code, err = cli(["run", str(config_file(tmp_path, tiny_run_config(tmp_path))), "--out", str(out)], capsys)
    assert code == 2 and "cannot create the run directory /sys/clagent-test-run/run: " in " ".join(err.split()), err
    assert not out.parent.exists()


def test_a_run_directory_carries_the_marker(finished_run: tuple[dict[str, Any], Path]) -> None:
    marker = json.loads((finished_run[1] / ".clagent-run").read_text())
    assert marker["clagent_run"] == 1 and "created" in marker


FAILING_OVERWRITES: dict[str, tuple[list[str], str]] = {  # --set items, the message
    "img_size below the patch (config)": (["backbone.img_size=7"],
                                          "img_size=7 is below its minimum input size of 8 px"),
    "unknown head (strategy built under the lock)": (["strategy.head=bogus"], "unknown head 'bogus'"),
    "uneven split (scenario built under the lock)": (["scenario.n_experiences=3"], "cannot be split evenly"),
}


@pytest.mark.parametrize("case", list(FAILING_OVERWRITES))
def test_failing_overwrite_leaves_the_finished_run_intact(run_copy, tmp_path: Path, capsys, case: str) -> None:
    """--overwrite replaces a run only once the new run is built: a config that cannot run destroys nothing."""
    cfg, out = run_copy
    overrides, message = FAILING_OVERWRITES[case]
    path = config_file(tmp_path, cfg)
    before = listing(out)
    code, err = cli(["run", str(path), "--overwrite", *(a for o in overrides for a in ("--set", o))], capsys)
    assert code == 2 and message in " ".join(err.split()) and "Traceback" not in err, err
    assert listing(out) == before
    assert_usable(cfg, out)


def test_overwrite_replaces_a_run_and_keeps_its_marker(run_copy) -> None:
    cfg, out = run_copy
    marker = (out / ".clagent-run").read_bytes()
    (out / "report.html").write_text("old report")
    with one_thread():
        run(with_strategy(cfg, head="lda"), overwrite=True, console=QUIET)
    assert read_yaml(out / "config.yaml")["strategy"]["head"] == "lda"
    assert (out / ".clagent-run").read_bytes() == marker and not (out / "report.html").exists()
    assert load_checkpoint(out / "checkpoints")["experiences_done"] == [0, 1]


def test_a_run_from_before_the_marker_is_a_run(run_copy, capsys) -> None:
    """A run directory of an older clagent (config.yaml and checkpoints, no marker) resumes and gets the marker; the
    same folder without its checkpoints is no run and is refused."""
    _, out = run_copy
    (out / ".clagent-run").unlink()
    assert cli(["run", "--resume", str(out)], capsys)[0] == 0
    assert (out / ".clagent-run").is_file()
    (out / ".clagent-run").unlink()
    shutil.rmtree(out / "checkpoints")
    before = listing(out)
    code, err = cli(["run", "--resume", str(out)], capsys)
    assert code == 2 and "is a folder that is not a clagent run" in " ".join(err.split()), err
    assert listing(out) == before


@pytest.mark.parametrize("how", ["same config", "--overwrite", "--resume"])
def test_a_locked_run_is_refused(run_copy, tmp_path: Path, capsys, how: str) -> None:
    """A second process on a run directory (here: the lock a live ``cl run`` holds) is refused and changes nothing."""
    cfg, out = run_copy
    argv = {"same config": ["run", str(config_file(tmp_path, cfg))],
            "--overwrite": ["run", str(config_file(tmp_path, cfg)), "--overwrite"],
            "--resume": ["run", "--resume", str(out)]}[how]
    before = listing(out)
    with open(out / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, err = cli(argv, capsys)
    assert code == 2 and f"{out} is in use by another clagent process" in " ".join(err.split()), err
    assert listing(out) == before


@pytest.mark.slow
def test_two_simultaneous_overwrites_one_wins_the_other_exits_2(run_copy, tmp_path: Path) -> None:
    """Two ``cl run --overwrite`` processes on one run at once: one replaces it, the other is refused at the lock
    (the run pauses 4 s before each experience, so their runs overlap)."""
    cfg, out = run_copy
    slow = {**cfg, "strategy": {"name": "simplecil_slow"}, "imports": [str(Path(__file__).parent / "slow_plugin.py")]}
    argv = [sys.executable, "-m", "cl", "run", str(config_file(tmp_path, slow)), "--overwrite", "--no-report"]
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.communicate(timeout=300)[1], p.returncode) for p in procs]
    assert sorted(code for _, code in results) == [0, 2], results
    loser = next(err for err, code in results if code == 2)
    assert f"{out} is in use by another clagent process" in " ".join(loser.split()), loser
    assert read_yaml(out / "config.yaml")["strategy"]["name"] == "simplecil_slow"
    assert json.loads((out / "metrics.json").read_text())["experiences_done"] == 2
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert [e["experience"] for e in events if e["kind"] == "experience_start"] == [0, 1]  # one run's events


# ---- --resume with other options: honoured or refused -------------------------------------------

RESUME_REFUSED: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    "--out": (lambda tmp: ["--out", str(tmp / "elsewhere")], "continues the run in that directory; drop --out"),
    "--overwrite": (lambda tmp: ["--overwrite"], "continues the run in that directory; drop --overwrite"),
    "--import of a plugin the run does not import": (lambda tmp: ["--import", "tests/cl/slow_plugin.py"],
                                                     "does not import it; a resumed run imports what its config names"),
    "--set a result-changing key": (lambda tmp: ["--set", "strategy.head=lda"],
                                    "would change the results of a resumed run"),
    "--device gpu": (lambda tmp: ["--device", "gpu"], "not a device: use auto, cpu, cuda or cuda:N"),
}


@pytest.mark.parametrize("case", list(RESUME_REFUSED))
def test_resume_refuses_options_it_cannot_honour(run_copy, tmp_path: Path, capsys, case: str) -> None:
    _, out = run_copy
    args, message = RESUME_REFUSED[case]
    before = listing(tmp_path)
    code, err = cli(["run", "--resume", str(out), *args(tmp_path)], capsys)
    assert code == 2 and message in " ".join(err.split()) and "Traceback" not in err, err
    assert listing(tmp_path) == before


def test_resume_honours_device_and_logger(run_copy, monkeypatch, capsys) -> None:
    _, out = run_copy
    calls: list[tuple[Any, dict[str, Any]]] = []
    monkeypatch.setattr("cl.run.run", lambda cfg, **kw: calls.append((cfg, kw)) or {})
    assert cli(["run", "--resume", str(out), "--device", "cuda:1", "--logger", "csv,console"], capsys)[0] == 0
    (cfg, kw), = calls
    assert (cfg.device, cfg.loggers, cfg.out, kw["resume"]) == ("cuda:1", ["csv", "console"], str(out), True)


# ---- cl report: its --out, and metrics.json of another shape ------------------------------------

def test_report_out_a_directory_is_refused(run_copy, tmp_path: Path, capsys) -> None:
    _, out = run_copy
    (tmp_path / "reports").mkdir()
    before = listing(tmp_path)
    code, err = cli(["report", str(out), "--out", str(tmp_path / "reports")], capsys)
    assert code == 2 and f"{tmp_path / 'reports'} is a directory: --out names the HTML file to write" in \
        " ".join(err.split()), err
    assert listing(tmp_path) == before  # no reports.tmp


BAD_METRICS: dict[str, tuple[Any, str]] = {
    "a list": ([1, 2], "it holds a JSON list, not an object of metrics"),
    "a number for the matrix": ({"accuracy_matrix": 5}, "'accuracy_matrix' must be a list of rows of numbers, got 5"),
    "text in a row": ({"accuracy_matrix": [[0.5, "x"]]}, "'accuracy_matrix' must be a list of rows of numbers"),
    "a flat matrix": ({"accuracy_matrix": [0.5, 0.7]}, "'accuracy_matrix' must be a list of rows of numbers"),
    "text for seen accuracy": ({"accuracy_seen": "high"}, "'accuracy_seen' must be a list of numbers"),
    "text for the count": ({"n_experiences": "two"}, "'n_experiences' must be a count of experiences"),
}


@pytest.mark.parametrize("case", list(BAD_METRICS))
def test_report_refuses_metrics_of_another_shape(run_copy, tmp_path: Path, capsys, case: str) -> None:
    _, out = run_copy
    metrics, message = BAD_METRICS[case]
    (out / "metrics.json").write_text(json.dumps(metrics))
    before = listing(tmp_path)
    code, err = cli(["report", str(out), "--out", str(tmp_path / "r.html")], capsys)
    assert code == 2 and f"metrics.json is not a clagent metrics file: {message}" in " ".join(err.split()), err
    assert listing(tmp_path) == before


@pytest.mark.parametrize("make", [not_a_run_folder, lambda p: p.write_text("mine")], ids=["a folder", "a file"])
def test_sweep_never_writes_into_a_folder_no_sweep_made(tmp_path: Path, capsys, make: Callable[[Path], None]) -> None:
    make(tmp_path / "place")
    cfg = config_file(tmp_path, tiny_run_config(tmp_path, "simplecil"))
    before = listing(tmp_path)
    code, err = cli(["sweep", str(cfg), "--grid", "strategy.head=ncm,lda", "--out", str(tmp_path / "place")], capsys)
    assert code == 2 and "place is a f" in err and "Traceback" not in err, err
    assert listing(tmp_path) == before
