"""Reading weight files into state dicts and loading them strictly, with errors that name the keys."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from cl.errors import CheckpointError

StateDict = dict[str, torch.Tensor]

#: wrappers that training scripts put around a state dict
_CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "module")
#: prefixes that wrappers (DDP, Lightning, our backbones) put in front of every key
COMMON_PREFIXES = ("module.", "model.", "_orig_mod.")


def read_state_dict(path: str | Path) -> StateDict:
    """A state dict from a .pth/.pt/.bin (torch) or .safetensors file, unwrapped from common containers."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: object = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, pickle with foreign classes, bad header...
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {e}") from e
    while isinstance(obj, Mapping) and (key := next((k for k in _CONTAINER_KEYS if k in obj), None)):
        obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{str(path)!r} does not hold a state dict (a mapping of names to tensors)")
    return dict(obj)


def strip_prefixes(state_dict: StateDict, prefixes: Iterable[str] = COMMON_PREFIXES) -> StateDict:
    """Remove wrapper prefixes that every key shares (repeatedly: ``module.model.x`` -> ``x``)."""
    prefixes = tuple(prefixes)
    while state_dict and (p := next((p for p in prefixes if all(k.startswith(p) for k in state_dict)), None)):
        state_dict = {k[len(p) :]: v for k, v in state_dict.items()}
    return state_dict


def select_prefix(state_dict: StateDict, prefix: str) -> StateDict:
    """The keys under ``prefix`` with it removed, when there are any (e.g. the ``visual.`` tower of CLIP)."""
    sub = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return sub or state_dict


def drop_keys(state_dict: StateDict, prefixes: Iterable[str]) -> StateDict:
    """Without the keys starting with any of ``prefixes`` (classifier heads)."""
    prefixes = tuple(prefixes)
    return {k: v for k, v in state_dict.items() if not k.startswith(prefixes)} if prefixes else state_dict


def load_strict(module: nn.Module, state_dict: StateDict, source: str) -> None:
    """Load every key of ``module`` from ``state_dict``; any missing, extra or reshaped key is an error."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    reshaped = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    problems = [
        f"{len(keys)} {what} ({_few(keys)})"
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("with another shape", reshaped))
        if keys
    ]
    if problems:
        raise CheckpointError(
            f"{source} does not fit {type(module).__name__}: "
            + "; ".join(problems)
            + ". Is it a checkpoint of this architecture and size?"
        )
    module.load_state_dict(state_dict, strict=True)


def _few(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")
