"""BatchNorm folded into the convolution before it: faster inference copies of a frozen CNN's blocks (their strided
depthwise "same"-padded convolutions also padded without a copy: ``CroppedSameConv2d``).

A frozen backbone runs in eval mode, where ``BatchNorm2d`` is a fixed per-channel affine map; folded into the
preceding convolution's weights and bias (``torch.nn.utils.fusion.fuse_conv_bn_weights``) it costs nothing. On
EfficientNet-Lite0 this makes the frozen forward about 1.45x faster on CPU in batches of 64-256 and 1.03-1.12x at
batch 1 (``python -m benchmarks.fold``, benchmarks/RESULTS.md).

The copy is made lazily and kept while what it copies stays the same (``Snapshot``: every parameter and buffer,
its in-place version, grad flag and data, every module's children, training flag and hooks): loading other
weights or unfreezing a block makes the next call rebuild or refuse it. The source module (its state dict,
parameter counts, hooks) is never touched.
"""

from __future__ import annotations

import copy
import functools
import itertools
import sys
from collections.abc import Hashable, Iterator, Sequence
from itertools import chain
from operator import attrgetter, is_, methodcaller
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as module_hooks
from torch.nn.utils.fusion import fuse_conv_bn_weights


def _walk(module: nn.Module, skip: set[int]) -> Iterator[nn.Module]:
    """``module`` and its submodules, depth first, except those in ``skip`` (ids) and what they hold."""
    if id(module) not in skip:
        yield module
        for child in module.children():
            yield from _walk(child, skip)


def fold_batchnorm(module: nn.Module, keep: Sequence[nn.Module] = ()) -> int:
    """Fold, in place, every ``BatchNorm2d`` that directly follows a ``Conv2d`` among its parent's children into that
    convolution; the norm becomes its dropout and activation (timm's ``BatchNormAct2d``; the one of them that is not
    the identity alone) or ``nn.Identity``. Modules in ``keep`` (and what they hold) are left alone. Returns how many
    were folded. Only for modules whose children are declared in the order they run (timm's CNN blocks)."""
    skip = {id(m) for m in keep}
    folded = 0
    for parent in list(_walk(module, skip)):
        names = list(parent._modules)
        for a, b in itertools.pairwise(names):
            conv, bn = parent._modules[a], parent._modules[b]
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats):
                continue
            if id(conv) in skip or id(bn) in skip:  # a kept pair whose parent folds: leave it as it is
                continue
            w, bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                           bn.weight, bn.bias)
            if conv.weight.is_contiguous(memory_format=torch.channels_last):
                w = nn.Parameter(w.contiguous(memory_format=torch.channels_last), requires_grad=False)
            conv.weight, conv.bias = w, bias
            after = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None))
                     if m is not None and not isinstance(m, nn.Identity)]
            parent._modules[b] = after[0] if len(after) == 1 else nn.Sequential(*after) if after else nn.Identity()
            folded += 1
    return folded


class CroppedSameConv2d(nn.Conv2d):
    """A strided depthwise convolution with TensorFlow's "same" padding (timm's ``Conv2dSame``: pad the input, more
    at the bottom and right, then convolve) computed as one convolution with symmetric padding whose leading extra
    rows and columns are cropped: the same sums without the padded copy of the input. On EfficientNet-Lite0's
    strided depthwise layers at batch 32 (one CPU thread, channels-last), 0.75 / 0.37 / 0.12 ms against 1.48 / 0.63 /
    0.19 ms for timm's, the output the same bit for bit on channels-last inputs there (``benchmarks/RESULTS.md``,
    "Start-up"); a dense
    convolution (the stem) gains nothing and rounds differently, so it stays as it is."""

    @staticmethod
    def _plan(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int, int]:
        """``(symmetric padding, first output kept, outputs kept)`` along one side of ``size``."""
        n = -(-size // stride)
        total = max((n - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
        before, after = total // 2, total - total // 2
        pad = before + stride * -(-(after - before) // stride)  # >= after, and the windows start where timm's do
        return pad, (pad - before) // stride, n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (ph, h0, nh), (pw, w0, nw) = (self._plan(x.shape[i - 2], self.kernel_size[i], self.stride[i],
                                                  self.dilation[i]) for i in (0, 1))
        y = nn.functional.conv2d(x, self.weight, self.bias, self.stride, (ph, pw), self.dilation, self.groups)
        return y[:, :, h0 : h0 + nh, w0 : w0 + nw]


def crop_same_padding(module: nn.Module, keep: Sequence[nn.Module] = ()) -> int:
    """Replace, in place, every strided depthwise timm ``Conv2dSame`` with a ``CroppedSameConv2d`` holding the same
    parameters; modules in ``keep`` (and what they hold) are left alone. Returns how many were replaced."""
    same = getattr(sys.modules.get("timm.layers.conv2d_same"), "Conv2dSame", None)
    if same is None:  # timm never loaded: no such layer anywhere
        return 0
    replaced = 0
    for parent in list(_walk(module, {id(m) for m in keep})):
        for name, conv in list(parent._modules.items()):
            if not (type(conv) is same and conv.groups == conv.in_channels == conv.out_channels
                    and max(conv.stride) > 1 and conv.padding_mode == "zeros"):
                continue
            new = CroppedSameConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0,
                                    conv.dilation, conv.groups, bias=conv.bias is not None, device="meta")
            new.weight, new.bias = conv.weight, conv.bias
            new.train(conv.training)
            parent._modules[name] = new
            replaced += 1
    return replaced


Signature = tuple[Any, ...]


def signature(modules: Sequence[nn.Module]) -> Signature:
    """What a copy of ``modules`` (every module, submodules listed too) depends on, read without touching data: per
    module its children's identities, training flag and hooks, and its own parameters' and buffers' identities,
    in-place versions, grad flags, devices and dtypes (``.to`` and ``.half()`` may swap a parameter's data in
    place). Tensors made under ``torch.inference_mode`` keep no version: for them only replacing the tensor
    (``load_state_dict`` outside inference mode, ``.to``) is seen. One flat tuple (a module's entry, then its
    tensors' fields): it is read on every call of a folded copy."""
    out: list[Any] = []
    for m in modules:
        out.append((*map(id, m._modules.values()), m.training, bool(m._forward_hooks or m._forward_pre_hooks)))
        for tensors in (m._parameters, m._buffers):
            for t in tensors.values():
                if t is not None:
                    out += (id(t), -1 if t.is_inference() else t._version, t.requires_grad, t.device, t.dtype)
    return tuple(out)


_VALUES, _DATA_PTR = methodcaller("values"), methodcaller("data_ptr")
_VERSION, _GRAD, _TRAINING = attrgetter("_version"), attrgetter("requires_grad"), attrgetter("training")
_HOOKS, _PRE_HOOKS = attrgetter("_forward_hooks"), attrgetter("_forward_pre_hooks")
_DICTS = attrgetter("_parameters", "_buffers", "_modules")
_registrations = 0  # modules, parameters and buffers set on any module (torch's global registration hooks)


def _registered(*_: object) -> None:
    global _registrations
    _registrations += 1


@functools.cache
def _watch_registrations() -> None:
    """Count every module, parameter and buffer set on a module from now on (installed once, on first use)."""
    for register in (module_hooks.register_module_module_registration_hook,
                     module_hooks.register_module_parameter_registration_hook,
                     module_hooks.register_module_buffer_registration_hook):
        register(_registered)


class Snapshot:
    """What a copy of ``modules`` (every module, submodules listed too) depends on, checked on every call of the copy.

    Every call (one C-level ``map`` per field, a few microseconds per hundred objects): the parameter, buffer and
    child dicts that held something hold the same entries (held here, compared by identity; also what
    ``Module._apply``, a direct ``_modules[name] = ...`` or ``del seq[i]`` change); the tensors keep their in-place
    versions, grad flags and data pointers (``.to``, ``.half()`` and ``.data =`` swap a tensor's data in place,
    which keeps its version); every module keeps its training flag and has no forward hook. When a module,
    parameter or buffer was set on any module since the snapshot (torch's global registration hooks count them),
    also the full ``signature`` once, which adds devices, dtypes and every module's children.

    Not seen: plain attributes (a norm's ``eps``), in-place writes through ``.data`` (it has a version counter of
    its own), and entries written straight into a dict that was empty (or a module's dict replaced by another);
    after such a change call ``Backbone.refold()``."""

    __slots__ = ("dicts", "fast", "full", "held", "live", "modules", "seen", "versioned")

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        _watch_registrations()
        self.seen = _registrations  # read first: a registration during the reads below is checked on the next call
        self.modules = tuple(modules)
        self.full = signature(self.modules)
        self.dicts = [d for d in chain.from_iterable(map(_DICTS, self.modules)) if d]
        self.held = list(chain.from_iterable(map(_VALUES, self.dicts)))  # tensors, None entries and children
        self.live = [t for t in self.held if isinstance(t, torch.Tensor)]
        self.versioned = [t for t in self.live if not t.is_inference()]
        self.fast = self._fast()

    def _fast(self) -> tuple[Any, ...]:
        live, mods = self.live, self.modules
        return (list(map(_VERSION, self.versioned)), list(map(_GRAD, live)), list(map(_DATA_PTR, live)),
                list(map(_TRAINING, mods)), any(map(_HOOKS, mods)) or any(map(_PRE_HOOKS, mods)))

    @property
    def foldable(self) -> bool:
        """Nothing in training mode, hooked (a copy would bypass the hook) or trainable."""
        _, grads, _, training, hooked = self.fast
        return not (hooked or any(training) or any(grads))

    def current(self) -> bool:
        """Whether the modules still hold what they held when this snapshot was taken."""
        now = list(chain.from_iterable(map(_VALUES, self.dicts)))
        if len(now) != len(self.held) or not all(map(is_, now, self.held)) or self._fast() != self.fast:
            return False
        if self.seen != _registrations:
            seen = _registrations
            if signature(self.modules) != self.full:
                return False
            self.seen = seen
        return True


class FoldedCopies:
    """Folded copies of a module, one per ``key`` (e.g. a prefix length), rebuilt when what they copy changes.

    Kept outside the module tree (no submodule registration): it never shows in state dicts or parameter counts.
    """

    def __init__(self) -> None:
        # key -> (what the copy depends on: the modules given, then every submodule; the copy or None)
        self._copies: dict[Hashable, tuple[Snapshot, nn.Module | None]] = {}

    def get(self, source: nn.Module, key: Hashable, depends_on: Sequence[nn.Module],
            shared: Sequence[nn.Module] = ()) -> nn.Module | None:
        """A folded deep copy of ``source``, current for ``depends_on`` (with their submodules); None while something
        there trains, is in train mode or hooked. ``shared`` modules are not copied (the copy refers to the source's)
        nor folded, and what they hold is not depended on, also where it sits inside ``depends_on``."""
        found = self._copies.get(key)
        if found is not None:
            snap, clone = found
            if all(map(is_, depends_on, snap.modules)) and snap.current():
                return clone
        apart = {id(sub) for m in shared for sub in m.modules()}  # shared subtrees run as themselves: not depended on
        flat = [*depends_on, *(sub for m in depends_on for sub in m.modules() if sub is not m and id(sub) not in apart)]
        snap, clone = Snapshot(flat), None  # before the copy: a change while it is made is seen on the next call
        if snap.foldable:
            memo: dict[int, object] = {id(m): m for m in shared}
            clone = copy.deepcopy(source, memo)
            fold_batchnorm(clone, keep=shared)
            crop_same_padding(clone, keep=shared)
        self._copies[key] = (snap, clone)
        return clone

    def clear(self) -> None:
        """Drop every copy: the next call of each part builds it again."""
        self._copies.clear()

    def __deepcopy__(self, memo: dict[int, object]) -> FoldedCopies:
        return FoldedCopies()  # a copied backbone makes its own
