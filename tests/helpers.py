"""Shared test settings: the tiny configs every engine test runs on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from cl.callbacks.base import Callback
from cl.descriptors import DescriptorSet

# Tiny random-init backbones of each kind (transformer, CLIP tower, CNN, text encoder).
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
TINY = {
    "vit_tiny_test": {},
    "open_clip_tiny_test": {},
    "efficientnet_lite0": {"weights": "none", "img_size": 32},
    "minilm": {"weights": "none", "config": TINY_BERT},
}
SENTENCES = ["a cat sits on the mat", "two dogs run in a park on a sunny day", "hi"]

TINY_SCENARIO = {"name": "synthetic", "n_classes": 6, "n_experiences": 3, "train_per_class": 24,
                 "test_per_class": 12, "image_size": 16}
TINY_BACKBONE = {"name": "vit_tiny_test"}


@contextmanager
def gloo_group(rank: int, world: int, init_file: str) -> Iterator[None]:
    """This process as rank ``rank`` of a gloo group of ``world`` processes met through ``init_file`` (the body of
    a ``torch.multiprocessing.spawn`` worker); the group is left at the end."""
    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        yield
    finally:
        tdist.destroy_process_group()


def state_differences(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], relative: float,
                      absolute: float = 0.0) -> dict[str, Any]:
    """The entries of two state dicts that differ: missing on one side, another shape, or
    ``|got - want| > relative * |want| + absolute`` (norms over the tensor, float64); name -> what differs."""
    out: dict[str, Any] = {k: "missing" for k in got.keys() ^ want.keys()}
    for k in got.keys() & want.keys():
        a, b = got[k].double(), want[k].double()
        if a.shape != b.shape:
            out[k] = f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
        elif (a - b).norm() > relative * b.norm() + absolute:
            out[k] = float((a - b).norm() / b.norm().clamp_min(1e-12))
    return out


def tiny_config(tmp_path, strategy: str = "finetune", **strategy_params: Any) -> dict[str, Any]:
    """A run config on the synthetic stream and the tiny random ViT."""
    return {
        "seed": 0, "device": "cpu", "out": str(tmp_path / "run"), "progress": False,
        "scenario": dict(TINY_SCENARIO), "backbone": dict(TINY_BACKBONE),
        "strategy": {"name": strategy, **strategy_params}, "eval": {"batch_size": 64},
    }


@contextmanager
def one_thread() -> Iterator[None]:
    """Tiny ops gain nothing from a second thread; on a busy CPU OpenMP contention made them ~100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def close_states(a: Any, b: Any, atol: float) -> bool:
    """Two (nested) states equal, floating-point tensors up to ``atol``: a run resumed from a checkpoint another
    CPU wrote (its kernels round differently) against this machine's own run."""
    if isinstance(a, torch.Tensor):
        if not (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape):
            return False
        return torch.allclose(a, b, rtol=0, atol=atol) if a.is_floating_point() else torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(close_states(a[k], b[k], atol) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(
            close_states(x, y, atol) for x, y in zip(a, b, strict=True))
    return a == b


def python_json(script: str, *args: str, **env: str) -> Any:
    """Run ``script`` (with ``args``) in a fresh interpreter, the repository first on its path and ``env`` added to
    this environment; what the JSON on its last line of output holds. A failing script fails the test with its
    stderr."""
    root = str(Path(__file__).resolve().parent.parent)
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": root, **env})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def subspace_sampler(seed: int, dim: int = 32, rank: int = 4):
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed)))[0][:, :rank]
    return lambda n: torch.randn(n, rank) @ basis.T * 3 + 0.05 * torch.randn(n, dim)


def fit(descriptors: DescriptorSet, name: str, sample) -> None:
    """Train descriptor ``name`` on ``sample``'s distribution and record its training losses."""
    d = descriptors.add(name)
    opt = torch.optim.Adam(d.parameters(), lr=1e-2)
    with one_thread():
        for _ in range(300):
            opt.zero_grad()
            d.loss(sample(128)).backward()
            opt.step()
    with torch.no_grad():
        d.record(d.losses(sample(500)))


class StopBefore(Callback):
    """Interrupts a run before experience ``exp_id`` starts, as Ctrl-C would (``KeyboardInterrupt``)."""

    def __init__(self, exp_id: int = 2) -> None:
        self.exp_id = exp_id

    def before_experience(self, agent, exp) -> None:
        if exp.id == self.exp_id:
            raise KeyboardInterrupt


class SignalAt(Callback):
    """SIGTERM after the ``at``-th training step of experience ``exp_id`` (counted over all its training loops): the
    run stops with a resume point inside the experience."""

    def __init__(self, exp_id: int, at: int) -> None:
        self.exp_id, self.at, self.current, self.steps = exp_id, at, -1, 0

    def before_experience(self, agent: Any, exp: Any) -> None:
        self.current, self.steps = exp.id, 0

    def after_iteration(self, agent: Any, iteration: int, loss: float) -> None:
        self.steps += self.current == self.exp_id
        if self.current == self.exp_id and self.steps == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


def interrupted_and_resumed(cfg: dict[str, Any], at: int = 2) -> dict[str, Any]:
    """Run ``cfg`` until experience ``at`` starts, interrupt it, resume it from its checkpoint; the final metrics."""
    from cl.run import run

    with pytest.raises(KeyboardInterrupt):
        run(cfg, extra_callbacks=[StopBefore(at)])
    return run(cfg, resume=True)


def doc_blocks(path: Any, lang: str = "python", section: str | None = None) -> list[str]:
    """The fenced ``lang`` code blocks of a Markdown file, in order; ``section``: only those under the heading that
    starts with it (up to the next heading of the same or a higher level)."""
    import re
    from pathlib import Path

    text = Path(path).read_text()
    if section is not None:
        found = re.search(rf"^(#+) {re.escape(section)}.*$", text, flags=re.M)
        assert found, f"no section {section!r} in {path}"
        level = len(found.group(1))
        rest = text[found.end():]
        end = re.search(rf"^#{{1,{level}}} ", rest, flags=re.M)
        text = rest[: end.start()] if end else rest
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)
