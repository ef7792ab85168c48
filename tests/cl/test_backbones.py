"""Backbones: shapes, the prefix/suffix split, preprocessing, errors, checkpoints; two real-weight checks."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cl.backbones import Backbone, create_backbone, list_backbones, resolve_timm_name
from cl.errors import CheckpointError, ConfigError, DataError
from tests.helpers import SENTENCES, TINY

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def tiny(name: str) -> Backbone:
    torch.manual_seed(0)
    return create_backbone(name, **TINY[name]).eval()


@pytest.fixture(scope="module", params=list(TINY))
def backbone(request: pytest.FixtureRequest) -> Backbone:
    return tiny(request.param)


def raw_batch(b: Backbone, n: int = 3) -> torch.Tensor | list[str]:
    if b.data_config.modality == "text":
        return SENTENCES[:n]
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=generator)


@torch.no_grad()
def test_output_shape_and_describe(backbone: Backbone) -> None:
    out = backbone(backbone.prepare(raw_batch(backbone)))
    assert out.shape == (3, backbone.embed_dim)
    assert torch.isfinite(out).all()
    assert len(backbone.block_dims()) == backbone.num_blocks > 0
    info = backbone.describe()
    assert info["name"] and info["weights"] == "random init" and info["num_blocks"] == backbone.num_blocks
    assert info["params"] == sum(p.numel() for p in backbone.parameters())


@torch.no_grad()
def test_prefix_split_equals_full_forward(backbone: Backbone) -> None:
    x = backbone.prepare(raw_batch(backbone))
    full = backbone.forward_features(x)
    for k in range(backbone.num_blocks + 1):
        split = backbone.forward_from(backbone.forward_until(x, k), k)
        torch.testing.assert_close(split, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["vit_tiny_test", "open_clip_tiny_test", "efficientnet_lite0"])
def test_prepare_images(name: str) -> None:
    b = tiny(name)
    c, h, w = b.data_config.input_size
    gray = b.prepare(torch.full((2, 1, 28, 28), 255, dtype=torch.uint8))
    assert gray.shape == (2, c, h, w) and gray.dtype == torch.float32
    white = (1 - torch.tensor(b.data_config.mean)) / torch.tensor(b.data_config.std)
    torch.testing.assert_close(gray[0, :, 0, 0], white)
    rgb = b.prepare(torch.rand(2, 3, 40, 50))
    assert rgb.shape == (2, c, h, w)
    assert rgb.is_contiguous(memory_format=torch.channels_last) == b.channels_last
    integer = b.prepare(torch.full((2, 1, 28, 28), 255, dtype=torch.int64))  # integer images are 0-255 too
    torch.testing.assert_close(integer, gray)
    bad_inputs = {torch.zeros(1, 28, 28): "expected", torch.zeros(2, 2, 28, 28): "expected",
                  torch.full((2, 1, 8, 8), 1000, dtype=torch.int64): "must lie in 0-255"}
    for bad, message in bad_inputs.items():
        with pytest.raises(DataError, match=message):
            b.prepare(bad)


def test_minilm_state_and_padding() -> None:
    b = tiny("minilm")
    ids, mask = b.prepare(SENTENCES)
    assert ids.shape == mask.shape and ids.dtype == torch.long
    with torch.no_grad():
        hidden, state_mask = b.forward_until((ids, mask), 1)
        assert hidden.shape == (*ids.shape, b.embed_dim) and torch.equal(state_mask, mask)
        together = b(b.prepare(SENTENCES))
        alone = torch.cat([b(b.prepare([s])) for s in SENTENCES])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)  # padding must not leak into embeddings
    torch.testing.assert_close(together.norm(dim=1), torch.ones(3))
    with pytest.raises(DataError, match="list of strings"):
        b.prepare(torch.zeros(2, 5))


def test_unknown_names_and_params() -> None:
    with pytest.raises(ConfigError, match="did you mean 'vit_tiny_test'"):
        create_backbone("vit_tiny_tset")
    with pytest.raises(ConfigError, match="valid keys"):
        create_backbone("vit_tiny_test", pretrianed=True)
    with pytest.raises(ConfigError, match="weights"):
        create_backbone("efficientnet_lite0", weights="imagenet21k")
    assert "vit_tiny_test" in list_backbones("vit_*")


def test_any_timm_vit_name() -> None:
    assert resolve_timm_name("vit_large_patch14_clip_224") == "vit_large_patch14_clip_224"
    assert resolve_timm_name("vit_base_patch16_224.augreg_in21k") is not None
    assert resolve_timm_name("resnet50") is None
    b = create_backbone("vit_tiny_patch16_224", img_size=32, model_kwargs={"depth": 2})
    assert b.name == "vit_tiny_patch16_224" and b.num_blocks == 2 and b.data_config.input_size == (3, 32, 32)


@pytest.mark.parametrize("name", ["vit_tiny_test", "open_clip_tiny_test", "efficientnet_lite0"])
def test_missing_checkpoint(name: str, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        create_backbone(name, checkpoint=str(tmp_path / "nope.pth"))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_vit_checkpoint_round_trip(suffix: str, tmp_path: Path) -> None:
    b = tiny("vit_tiny_test")
    path = tmp_path / f"vit{suffix}"
    if suffix == ".pth":  # the backbone's own state dict ("model." prefix) inside a training container
        torch.save({"state_dict": b.state_dict(), "epoch": 3}, path)
    else:  # bare timm keys plus a classifier head, which is dropped
        from safetensors.torch import save_file

        head = {"head.weight": torch.zeros(10, 32), "head.bias": torch.zeros(10)}
        save_file({**b.model.state_dict(), **head}, path)
    torch.manual_seed(1)
    b2 = create_backbone("vit_tiny_test", checkpoint=str(path)).eval()
    x = b.prepare(raw_batch(b))
    with torch.no_grad():
        torch.testing.assert_close(b2(x), b(x))
    assert b2.weights == f"checkpoint {path}"


def test_checkpoint_of_another_model_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "vit.pth"
    torch.save(tiny("vit_tiny_test").state_dict(), path)
    with pytest.raises(CheckpointError, match=r"missing .*unexpected"):
        create_backbone("open_clip_tiny_test", checkpoint=str(path))


def test_open_clip_tower_from_full_clip_checkpoint(tmp_path: Path) -> None:
    b = tiny("open_clip_tiny_test")
    clip = {f"visual.{k}": v for k, v in b.model.state_dict().items()}
    clip["text_projection"] = torch.zeros(4, 4)
    torch.save(clip, tmp_path / "clip.pt")
    torch.manual_seed(1)
    b2 = create_backbone("open_clip_tiny_test", checkpoint=str(tmp_path / "clip.pt")).eval()
    x = b.prepare(raw_batch(b))
    with torch.no_grad():
        torch.testing.assert_close(b2(x), b.model(x))


def test_efficientnet_loads_staged_timm_checkpoint(tmp_path: Path) -> None:
    import timm

    torch.manual_seed(0)
    ref = timm.create_model("tf_efficientnet_lite0", num_classes=0).eval()  # timm's blocks.S.B layout
    torch.save(ref.state_dict(), tmp_path / "timm.pth")
    b = create_backbone("efficientnet_lite0", checkpoint=str(tmp_path / "timm.pth"), img_size=32).eval()
    x = b.prepare(raw_batch(b))
    with torch.no_grad():
        torch.testing.assert_close(b(x), ref(x))


def test_pretrained_without_hub_says_what_to_do() -> None:
    try:
        create_backbone("vit_small_patch16_224", pretrained=True)  # offline on purpose: must fail fast with a hint
    except ConfigError as e:
        assert "checkpoint=" in str(e)
    else:
        pytest.skip("timm weights are in the local cache")


def _idx(path: Path) -> np.ndarray:
    data = gzip.decompress(path.read_bytes())
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion_mnist(split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = _idx(FASHION_MNIST / f"{split}-images-idx3-ubyte.gz")
    y = _idx(FASHION_MNIST / f"{split}-labels-idx1-ubyte.gz")
    pick = np.random.default_rng(0).permutation(len(y))[:n]
    return torch.from_numpy(x[pick].copy())[:, None], torch.from_numpy(y[pick].astype(np.int64))


@torch.no_grad()
def _ncm_accuracy(b: Backbone, train: tuple[torch.Tensor, ...], test: tuple[torch.Tensor, ...]) -> float:
    """Nearest-class-mean accuracy of cosine-normalised embeddings."""
    f_train, f_test = (F.normalize(b(b.prepare(x)), dim=1) for x in (train[0], test[0]))
    means = torch.stack([f_train[train[1] == c].mean(0) for c in range(10)])
    return (torch.cdist(f_test, means).argmin(1) == test[1]).float().mean().item()


@pytest.mark.realdata
def test_efficientnet_real_weights_separate_fashion_mnist() -> None:
    if not (FASHION_MNIST / "t10k-labels-idx1-ubyte.gz").exists():
        pytest.skip(f"FashionMNIST idx files not found under {FASHION_MNIST} (Debian dataset package)")
    train, test = _fashion_mnist("train", 400), _fashion_mnist("t10k", 200)
    real = create_backbone("efficientnet_lite0", img_size=64).eval()  # strict load: any unmapped key raises
    assert real.weights.startswith("imagenet")
    assert not torch.allclose(real.blocks[8].bn2.running_var, torch.ones(1))
    torch.manual_seed(0)
    random = create_backbone("efficientnet_lite0", weights="none", img_size=64).eval()
    assert _ncm_accuracy(real, train, test) > _ncm_accuracy(random, train, test) + 0.03


@pytest.mark.realdata
def test_minilm_real_weights_rank_paraphrases() -> None:
    b = create_backbone("minilm")
    assert b.embed_dim == 384 and b.num_blocks == 6
    with torch.no_grad():
        e = b(b.prepare(["A man is playing a guitar.", "Someone plays the guitar.", "Stocks fell today."]))
    assert (e[0] @ e[1]).item() > (e[0] @ e[2]).item() + 0.2


def test_state_helpers_batch_tensor_and_token_states_alike():
    """``cl.backbones.state``: rows, devices and concatenation of image states and (hidden, mask) text states."""
    from cl.backbones.state import cat_states, pad_cat, take_rows, to_device

    image = torch.arange(24.0).view(4, 2, 3)
    assert torch.equal(take_rows(image, slice(1, 3)), image[1:3])
    assert torch.equal(take_rows(image, torch.tensor([3, 0])), image.index_select(0, torch.tensor([3, 0])))
    assert torch.equal(cat_states([image[:1], image[1:]]), image)
    short = (torch.ones(2, 3, 4), torch.ones(2, 3, dtype=torch.long))
    long = (torch.full((1, 5, 4), 2.0), torch.ones(1, 5, dtype=torch.long))
    hidden, mask = cat_states([short, long])
    assert hidden.shape == (3, 5, 4) and mask.shape == (3, 5)
    assert mask[:2, 3:].sum() == 0 and hidden[:2, 3:].abs().sum() == 0  # padding: zero tokens, masked out
    assert torch.equal(take_rows((hidden, mask), torch.tensor([2]))[0], long[0])
    assert to_device(short, "cpu")[0].device.type == "cpu" and pad_cat([image]).shape == image.shape
