"""The frozen CNN prefix runs BatchNorm-folded: same outputs, source untouched, rebuilt or refused when it changes."""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn

from cl.backbones import Backbone, create_backbone
from cl.backbones.fold import CroppedSameConv2d, crop_same_padding, fold_batchnorm
from tests.helpers import TINY


def frozen_effnet(seed: int = 0) -> Backbone:
    """A random-init EfficientNet-Lite0 whose BatchNorms are not the identity (random statistics and affine)."""
    torch.manual_seed(seed)
    b = create_backbone("efficientnet_lite0", **TINY["efficientnet_lite0"])
    for m in b.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return b.requires_grad_(False).eval()


def images(b: Backbone, n: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return b.prepare(torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g))


def unfolded_until(b: Backbone, x: torch.Tensor, stop: int) -> torch.Tensor:
    state = b.forward_stem(x)
    for i in range(stop):
        state = b.forward_block(i, state)
    return state


@torch.no_grad()
def test_folded_prefix_matches_and_leaves_the_source_alone() -> None:
    b = frozen_effnet()
    keys, params = list(b.state_dict()), sum(p.numel() for p in b.parameters())
    x = images(b)
    for stop in (0, 5, b.num_blocks):
        assert b.prefix_runner(stop) is not b
        torch.testing.assert_close(b.forward_until(x, stop), unfolded_until(b, x, stop), atol=1e-4, rtol=1e-4)
    taps = b.forward_until(x, 6, taps=(1, 4))
    torch.testing.assert_close(taps.taps, torch.cat([b.pool_block(unfolded_until(b, x, k + 1)) for k in (1, 4)], 1),
                               atol=1e-4, rtol=1e-4)
    assert list(b.state_dict()) == keys and sum(p.numel() for p in b.parameters()) == params
    assert sum(isinstance(m, nn.BatchNorm2d) for m in b.modules()) == 49  # the source keeps every norm
    folded = b.prefix_runner(b.num_blocks)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.model.blocks.modules())
    assert folded.blocks[0] is not b.blocks[0]
    # the strided depthwise "same" convolutions run cropped in the copy (stages 2-4 and 6), timm's in the source
    assert sum(isinstance(m, CroppedSameConv2d) for m in folded.model.blocks.modules()) == 4
    assert not any(isinstance(m, CroppedSameConv2d) for m in b.modules())


@torch.no_grad()
def test_later_blocks_are_shared_not_copied_or_folded() -> None:
    b = frozen_effnet()
    run = b.prefix_runner(10)
    assert all(run.blocks[i] is b.blocks[i] for i in range(10, b.num_blocks))
    assert any(isinstance(m, nn.BatchNorm2d) for m in b.blocks[12].modules())


@torch.no_grad()
def test_new_weights_rebuild_the_copy() -> None:
    b, other = frozen_effnet(0), frozen_effnet(1)
    x = images(b)
    before = b.forward_until(x, 8)
    b.load_state_dict(other.state_dict())  # in-place copies: the version counters move
    after = b.forward_until(x, 8)
    assert not torch.allclose(before, after, atol=1e-3)
    torch.testing.assert_close(after, unfolded_until(other, x, 8), atol=1e-4, rtol=1e-4)


def test_training_unfrozen_or_hooked_prefix_runs_unfolded() -> None:
    b = frozen_effnet()
    assert b.prefix_runner(8) is not b
    b.blocks[3].requires_grad_(True)  # a fine-tuned block: its norm must stay a norm
    assert b.prefix_runner(8) is b and b.prefix_runner(3) is not b
    b.blocks[3].requires_grad_(False)
    seen = []
    handle = b.blocks[2].register_forward_hook(lambda m, a, o: seen.append(len(o)))
    assert b.prefix_runner(8) is b
    with torch.no_grad():
        b.forward_until(images(b), 8)
    assert seen == [4]  # the hook ran on the real block
    handle.remove()
    b.train()
    assert b.prefix_runner(8) is b


def test_backbones_without_batchnorm_never_copy() -> None:
    torch.manual_seed(0)
    vit = create_backbone("vit_tiny_test", **TINY["vit_tiny_test"]).requires_grad_(False).eval()
    assert vit.prefix_runner(2) is vit


def test_fold_batchnorm_counts_and_keeps() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1),
                          nn.BatchNorm2d(4)).eval()
    for m in model:
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 8, 8)
    ref = model(x)
    assert fold_batchnorm(model, keep=[]) == 2
    assert isinstance(model[1], nn.Identity) and model[0].bias is not None
    torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)
    kept = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    assert fold_batchnorm(nn.Sequential(kept), keep=[kept]) == 0


def test_adapted_blocks_end_the_folded_prefix_and_copies_fold_too() -> None:
    b = frozen_effnet()
    twin = copy.deepcopy(b)
    assert twin.prefix_runner(8) is not twin and twin.prefix_runner(8).blocks[0] is not b.prefix_runner(8).blocks[0]
    b.blocks[4] = nn.Sequential(b.blocks[4])  # what adapter injection does: a wrapper in the block's place
    assert b.prefix_runner(4) is not b and b.prefix_runner(5) is b


def test_backbone_built_under_inference_mode_folds() -> None:
    with torch.inference_mode():
        b = frozen_effnet()
        x = images(b)
        torch.testing.assert_close(b.forward_until(x, 8), unfolded_until(b, x, 8), atol=1e-4, rtol=1e-4)
        assert b.prefix_runner(8) is not b


@torch.no_grad()
def test_a_dtype_change_rebuilds_the_copy() -> None:
    b = frozen_effnet()
    x = images(b)
    b.forward_until(x, 6)
    b.double()  # swaps every parameter's data in place: same objects, same versions
    out = b.forward_until(x.double(), 6)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, unfolded_until(b, x.double(), 6), atol=1e-8, rtol=1e-8)


def unfolded_from(b: Backbone, state: torch.Tensor, start: int) -> torch.Tensor:
    for i in range(start, b.num_blocks):
        state = b.forward_block(i, state)
    return b.forward_pool(state)


def test_adapted_blocks_fold_inside_with_their_pools_shared_and_the_source_untouched() -> None:
    from cl.adapters import AdapterConfig, inject

    b = frozen_effnet()
    stem = b.model.conv_stem.weight.clone()
    ps = inject(b, AdapterConfig(layers=[-3, -2, -1]))
    for p in ps.values():
        p.add("a")
        with torch.no_grad():
            for q in p.adapters["a"].parameters():  # trainable, and not the zero delta
                q.normal_(0, 0.1)
    x = images(b)
    with torch.no_grad():
        state = unfolded_until(b, x, 13)
        run = b.suffix_runner(13)
        assert run is not b and b.prefix_runner(13) is not b
        assert all(run.blocks[i].pool is ps[i] for i in ps)  # shared, so they train and route as themselves
        assert not any(isinstance(m, nn.BatchNorm2d) for m in run.blocks[13].block.modules())
        torch.testing.assert_close(b.forward_from(state, 13), unfolded_from(b, state, 13), atol=1e-4, rtol=1e-4)
        # the source keeps every norm; the stem, shared with the suffix's copy, was not folded in place
        assert sum(isinstance(m, nn.BatchNorm2d) for m in b.modules()) == 49
        assert torch.equal(b.model.conv_stem.weight, stem) and isinstance(b.model.bn1, nn.BatchNorm2d)
        ps[15].adapters["a"].up.weight.add_(0.5)  # an adapter trained in place: the copy runs it as it is now
        torch.testing.assert_close(b.forward_from(state, 13), unfolded_from(b, state, 13), atol=1e-4, rtol=1e-4)
        assert b.suffix_runner(13) is run  # the pools are not what the copy depends on: no rebuild
    out = b.forward_from(state, 13)  # gradients reach the adapters through the folded blocks
    out.pow(2).sum().backward()
    assert all(p.adapters["a"].down.weight.grad is not None for p in ps.values())
    handle = b.blocks[14].register_forward_hook(lambda m, a, o: None)
    assert b.suffix_runner(13) is b  # a hooked adapted block runs as it is
    handle.remove()
    b.blocks[15] = nn.Sequential(b.blocks[15].block)  # a wrapper without ``block``: not folded through
    assert b.suffix_runner(13) is b and b.suffix_runner(16) is not b


@torch.no_grad()
def test_swapped_data_replaced_tensors_and_deep_changes_rebuild_the_copy() -> None:
    b, other = frozen_effnet(0), frozen_effnet(1)
    x = images(b)
    conv = b.blocks[2].conv_pw

    def current() -> None:
        torch.testing.assert_close(b.forward_until(x, 6), unfolded_until(b, x, 6), atol=1e-4, rtol=1e-4)
        b.forward_until(x, 6)  # a rebuild's own registrations make the next check a full one: the one after is fast

    current()
    conv.weight.data = other.blocks[2].conv_pw.weight.data.clone()  # same object, version, dtype: new data
    current()
    bn = b.blocks[1].bn1
    bn._buffers["running_mean"] = bn.running_mean + 1  # straight into the dict, as Module._apply does
    current()
    b.blocks[3].conv_dw = copy.deepcopy(other.blocks[3].conv_dw)  # a deep child replaced (setattr)
    current()
    b.blocks[2]._modules["bn1"] = copy.deepcopy(other.blocks[2].bn1)  # a child put straight into the dict
    current()
    del b.blocks[4].bn1._modules["act"]  # a parameterless child gone
    b.blocks[4].bn1.act = nn.Tanh()
    current()
    b.blocks[2].bn2.train()  # one norm of the prefix back to batch statistics
    assert b.prefix_runner(6) is b


@torch.no_grad()
def test_refold_after_what_the_check_cannot_see() -> None:
    b = frozen_effnet()
    x = images(b)
    b.forward_until(x, 6)
    b.blocks[3].bn2.eps = 0.5  # a plain attribute: the copy keeps the old one
    b.refold()
    torch.testing.assert_close(b.forward_until(x, 6), unfolded_until(b, x, 6), atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_cropped_same_convolution_equals_timms_padded_one() -> None:
    from timm.layers.conv2d_same import Conv2dSame

    torch.manual_seed(0)
    for kernel, stride, size, channels_last in itertools.product((3, 5, 7), (2, 3), range(1, 20), (False, True)):
        timm_conv = Conv2dSame(8, 8, kernel, stride=stride, groups=8)
        parent = nn.Sequential(copy.deepcopy(timm_conv))
        assert crop_same_padding(parent) == 1 and isinstance(parent[0], CroppedSameConv2d)
        assert parent[0].weight is not None and parent[0].weight.device.type == "cpu"
        x = torch.randn(3, 8, size, size + 1)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        want, got = timm_conv(x), parent[0](x)
        assert got.shape == want.shape, (kernel, stride, size)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    dense = nn.Sequential(Conv2dSame(3, 8, 3, stride=2), Conv2dSame(8, 8, 3, stride=1, groups=8))
    assert crop_same_padding(dense) == 0  # a dense convolution and an unstrided one stay timm's
