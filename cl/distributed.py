"""Data-parallel runs on ``torch.distributed``: one process per rank, launched by ``torchrun`` or ``cl run --nproc``.

What is split and what is decided once (docs/distributed.md):

- training: every rank draws the same seeded global batch and trains on its slice of it (``local_rows``);
  gradients are averaged with ``all_reduce`` weighted by slice size, so a step equals the single-process
  step on the whole batch, and every rank applies the same update;
- evaluation and memory embeddings: each rank takes a contiguous shard of the data; counts are summed and
  embeddings gathered, so every rank sees the totals;
- decisions: rank 0 decides (``broadcast``), e.g. SEMA's expansion, every rank applies it;
- after each experience ``sync_state`` checks that every rank holds the same strategy state (checksums) and
  copies rank 0's over any drift; files (checkpoints, memory, metrics, events, loggers) are written by rank 0.

A single process (no ``WORLD_SIZE`` in the environment) never touches ``torch.distributed``: every helper is
then the identity.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import subprocess
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from cl.errors import ConfigError


def is_distributed() -> bool:
    """Whether this process is one rank of an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def init_from_env(device: str = "auto", timeout_s: float = 1800) -> tuple[int, int, str]:
    """Join the process group ``torchrun`` describes in the environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``...); returns ``(rank, world_size, device)``.

    Backend: NCCL when the run uses CUDA (each rank on ``cuda:LOCAL_RANK``), gloo otherwise. Without
    ``WORLD_SIZE`` > 1 this does nothing and returns ``(0, 1, device)``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs: launch at most one "
                              "process per GPU (torchrun --nproc-per-node)")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size(), device


def launch(nproc: int, cl_args: list[str]) -> int:
    """``cl *cl_args`` as ``nproc`` processes on this machine (``torchrun --standalone``); returns the exit code.

    Each rank gets ``cpu_count // nproc`` threads unless ``OMP_NUM_THREADS`` is set. Several machines: run
    ``torchrun --nnodes ... -m cl run ...`` on each (docs/distributed.md).
    """
    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {nproc}")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "cl", *cl_args]
    return subprocess.run(cmd, env=env).returncode


def shutdown() -> None:
    """Leave the process group (end of a run)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def local_rows(n: int, r: int | None = None, world: int | None = None) -> slice:
    """Rank ``r``'s (default: this rank's) contiguous slice of ``n`` rows; sizes differ by at most one, and a
    rank may get none."""
    r = rank() if r is None else r
    world = world_size() if world is None else world
    base, extra = divmod(n, world)
    start = r * base + min(r, extra)
    return slice(start, start + base + (r < extra))


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast(obj: Any, src: int = 0) -> Any:
    """``obj`` as rank ``src`` has it (any picklable object), on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def _comm_device() -> torch.device:
    """Where small collective tensors live: the current GPU under NCCL (it reduces only CUDA tensors), else CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_sum(values: list[float] | list[int]) -> list[float]:
    """Element-wise sum of a list of numbers over ranks (float64)."""
    if not is_distributed():
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (e.g. a stop request)."""
    if not is_distributed():
        return flag
    t = torch.tensor([int(flag)], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def average_gradients(params: list[nn.Parameter], weight: float) -> None:
    """Replace each gradient by the sum over ranks of ``weight * grad`` (``weight`` = this rank's share of the
    global batch), in one flat ``all_reduce``. A parameter without a gradient on this rank contributes zeros."""
    if not is_distributed() or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads]).mul_(weight)
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p)
        offset += n


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows of ``t`` (``[n_r, ...]``, sizes may differ) in rank order, on every rank."""
    if not is_distributed():
        return t
    return torch.cat([part.to(t.device) for part in all_gather(t.cpu())])


def state_checksum(state: Any) -> str:
    """sha256 over a (nested) state: names, shapes, dtypes and bytes of tensors, ``repr`` of other values."""
    h = hashlib.sha256()

    def feed(key: str, v: Any) -> None:
        if isinstance(v, torch.Tensor):
            h.update(f"{key}:{tuple(v.shape)}:{v.dtype}".encode())
            h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(v, dict):
            for k in sorted(v, key=str):
                feed(f"{key}/{k}", v[k])
        elif isinstance(v, list | tuple):
            for i, x in enumerate(v):
                feed(f"{key}[{i}]", x)
        else:
            h.update(f"{key}={v!r}".encode())

    feed("", state)
    return h.hexdigest()


def same_on_all_ranks(state: Any) -> list[str]:
    """Every rank's ``state_checksum`` of ``state``, in rank order (one entry in a single process)."""
    return all_gather(state_checksum(state))
