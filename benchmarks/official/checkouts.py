"""Where the official SEMA and MOS code is, whether it is the commit we measure, and how it is imported.

The official code is never part of this project: the benchmark takes checkouts by path (``--sema-code``,
``--mos-code`` or the ``CL_SEMA_CODE`` / ``CL_MOS_CODE`` environment variables). A git checkout must be at the
expected commit; a plain folder (e.g. ``git archive`` output) is accepted with a warning. Both repositories
have top-level packages named ``backbone``, ``models`` and ``utils``, so each is imported inside
``official_code`` (its folder first on ``sys.path``, its modules removed again afterwards), together with
the runtime shims it needs here. Their files are never edited.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

#: top-level packages of both official repositories (the same names in each)
PACKAGES = ("backbone", "models", "utils")


@dataclass(frozen=True)
class Official:
    """One official repository: the commit measured, a file that must exist, how a path is given."""

    side: str
    repo: str
    commit: str
    marker: str
    env: str
    option: str


SEMA_CODE = Official("sema", "huiyiwang01/SEMA-CL", "5a4551262d659c6d93dd6c50ff814e028554fbf3", "models/sema.py",
                     "CL_SEMA_CODE", "--sema-code")
MOS_CODE = Official("mos", "sun-hailong/AAAI25-MOS", "8d5e07c1535176ca2fa0c36881f6fd630418ccbc", "models/mos.py",
                    "CL_MOS_CODE", "--mos-code")

#: what the benchmark changes at runtime so that the official code runs here (reported in the JSON)
SHIMS = [
    "timm.create_model is called with pretrained=False (no weights offline): their model builder "
    "(vit_base_patch16_224_sema / _mos) then loads a random-init timm ViT-B/16 into their ViT as usual",
    "torch.nn.Module.cuda returns the module unchanged and backbone.sema_block.device is 'cpu' (SEMA creates its "
    "routers with .cuda()); everything runs on the CPU",
    "models.sema.num_workers / models.mos.num_workers = 0 (hard-coded 8 DataLoader worker processes otherwise)",
    "their tqdm progress bars are disabled and their prints during model construction are swallowed",
    "their per-epoch test-set evaluation (Learner._compute_accuracy, SEMA) is replaced by a stub that only "
    "switches the model to eval mode as theirs does (no test set is evaluated on either side)",
]


@dataclass
class Checkout:
    """A located checkout: ``usable`` says whether the benchmark may run it, ``message`` why (not)."""

    code: Official
    path: Path | None
    commit: str | None
    usable: bool
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"repo": self.code.repo, "path": str(self.path) if self.path else None, "commit": self.commit,
                "expected_commit": self.code.commit, "usable": self.usable, "message": self.message}


def locate(code: Official, path: str | os.PathLike[str] | None) -> Checkout:
    """Check the checkout at ``path`` (or ``$<env>``): present, the right repository, the expected commit."""
    given = path if path is not None else os.environ.get(code.env)
    how = f"(give {code.option} PATH or set {code.env})"
    if not given:
        return Checkout(code, None, None, False, f"{code.side}: no checkout of {code.repo} given {how}")
    root = Path(given).expanduser().resolve()
    if not root.is_dir():
        return Checkout(code, root, None, False, f"{code.side}: {root} is not a folder {how}")
    if not (root / code.marker).is_file():
        return Checkout(code, root, None, False,
                        f"{code.side}: {root} has no {code.marker}: not a checkout of {code.repo} {how}")
    top = _git(root, "rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != root:
        return Checkout(code, root, None, True,
                        f"WARNING {code.side}: {root} is a plain folder, not a git checkout: its commit cannot be "
                        f"checked (expected {code.repo} @{code.commit[:7]})")
    head = _git(root, "rev-parse", "HEAD")
    if head != code.commit:
        return Checkout(code, root, head, False,
                        f"{code.side}: {root} is at commit {(head or '?')[:7]}, not {code.commit[:7]} of {code.repo}: "
                        f"check out {code.commit[:7]} to measure it")
    dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
    if dirty:
        return Checkout(code, root, head, True,
                        f"WARNING {code.side}: {root} @{head[:7]} has local changes to tracked files")
    return Checkout(code, root, head, True, f"{code.side}: {root} @{head[:7]}")


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


@contextlib.contextmanager
def official_code(checkout: Checkout) -> Iterator[None]:
    """Run the official code of ``checkout`` inside: its packages importable, the shims (``SHIMS``) applied.

    Everything about the official side (construction, training, inference) must run inside, since their code
    imports modules lazily and calls ``.cuda()`` during training. On exit their modules leave ``sys.modules``
    (objects built inside keep working) and the patched functions are restored.
    """
    if not checkout.usable or checkout.path is None:
        raise RuntimeError(checkout.message)
    import timm

    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k.split(".")[0] in PACKAGES}
    create_model, cuda = timm.create_model, torch.nn.Module.cuda

    @functools.wraps(create_model)
    def create_random(*args: Any, **kwargs: Any) -> Any:
        kwargs["pretrained"] = False
        return create_model(*args, **kwargs)

    def stay(self: torch.nn.Module, device: Any = None) -> torch.nn.Module:
        return self

    root = str(checkout.path)
    sys.path.insert(0, root)
    timm.create_model = create_random
    torch.nn.Module.cuda = stay
    try:
        with warnings.catch_warnings():  # their timm.models.layers / registry imports are deprecated aliases
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        timm.create_model, torch.nn.Module.cuda = create_model, cuda
        with contextlib.suppress(ValueError):
            sys.path.remove(root)
        for k in [k for k in sys.modules if k.split(".")[0] in PACKAGES]:
            del sys.modules[k]
        sys.modules.update(saved)


def quiet_module(module: Any) -> None:
    """Turn off a module's tqdm progress bars and its DataLoader worker processes (see ``SHIMS``)."""
    from tqdm import tqdm

    if hasattr(module, "tqdm"):
        module.tqdm = functools.partial(tqdm, disable=True)
    if hasattr(module, "num_workers"):
        module.num_workers = 0


@contextlib.contextmanager
def silent() -> Iterator[None]:
    """Swallow what the official code prints (model construction prints whole state-dict key lists)."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield
