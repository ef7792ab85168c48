"""Replay exemplars: which past samples a strategy keeps (herding, class quotas) and where (``ExemplarStore``).

The buffer lives in the experience memory: one ``exemplar`` entry per stored sample, its vector the memory
embedding (``Strategy.memory_embedding``) and its metadata the experience, class, sample index and selection
priority. What retraining needs, the sample's raw input, is kept by the ``ExemplarStore`` (saved in the strategy's
checkpoint) under the same id. Raw inputs rather than frozen-prefix states: a state is a function of the input while
the prefix is frozen, so nothing is lost; inputs are smaller to checkpoint (FashionMNIST: 784 bytes against 7 KB for
EfficientNet-Lite0 at 64 px, 600 KB for ViT-B/16 at 224 px) and stay valid if the frozen depth or augmentation
changes. ``cl.replay.ReplayMixin`` mixes the buffer into training.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from cl.data import ArrayDataset, Inputs
from cl.memory.memory import ExperienceMemory

Selection = Literal["herding", "reservoir"]  # how exemplars are chosen (``ExemplarStore.select``)


def herding(vectors: torch.Tensor, m: int) -> torch.Tensor:
    """Indices of ``m`` rows picked by herding (iCaRL, Rebuffi et al. 2017), in pick order.

    Each pick is the row that brings the mean of the rows picked so far closest to the mean of all rows;
    a prefix of the order is the herding choice for a smaller budget. Rows 0, 1, 2, 3, 10 (mean 3.2) are
    picked in the order 3, 2, 1, 10, 0 (the nearest-to-mean order would be 3, 2, 1, 0, 10).
    """
    x = vectors.float()
    n, m = len(x), min(m, len(x))
    mu_x = x @ x.mean(0)  # mean . x_i
    sq = (x * x).sum(1)  # |x_i|^2
    s_x = torch.zeros(n)  # s . x_i, with s the sum of the picked rows
    s_mu = s_sq = 0.0  # s . mean, |s|^2
    taken = torch.zeros(n, dtype=torch.bool)
    order = []
    for k in range(1, m + 1):
        # |mean - (s + x_i)/k|^2 up to a constant: -2/k mean.(s + x_i) + |s + x_i|^2 / k^2
        d = (-2.0 / k) * (s_mu + mu_x) + (s_sq + 2 * s_x + sq) / k**2
        i = int(d.masked_fill(taken, float("inf")).argmin())
        order.append(i)
        taken[i] = True
        s_sq += float(2 * s_x[i] + sq[i])
        s_mu += float(mu_x[i])
        s_x += x @ x[i]
    return torch.tensor(order, dtype=torch.long)


def class_quotas(classes: Sequence[int], budget: int) -> dict[int, int]:
    """Equal shares of ``budget`` over ``classes`` (in arrival order; the first ``budget % n`` get one more)."""
    if not classes:
        return {}
    base, extra = divmod(budget, len(classes))
    return {int(c): base + (i < extra) for i, c in enumerate(classes)}


class ExemplarStore(nn.Module):
    """Raw inputs, targets and selection priorities of the exemplars, one row per memory id.

    Held in the strategy's checkpoint (as extra state: inputs may be strings); the memory holds the
    matching ``exemplar`` entries.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ids = torch.zeros(0, dtype=torch.long)
        self.targets = torch.zeros(0, dtype=torch.long)
        self.priority = torch.zeros(0)
        self.inputs: Inputs | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def classes(self) -> list[int]:
        return sorted(set(self.targets.tolist()))

    def add(self, ids: np.ndarray, inputs: Inputs, targets: torch.Tensor, priority: torch.Tensor) -> None:
        self.ids = torch.cat([self.ids, torch.as_tensor(ids, dtype=torch.long)])
        self.targets = torch.cat([self.targets, targets.long()])
        self.priority = torch.cat([self.priority, priority.float()])
        if self.inputs is None:
            self.inputs = inputs
        elif isinstance(self.inputs, torch.Tensor):
            self.inputs = torch.cat([self.inputs, inputs])
        else:
            self.inputs = [*self.inputs, *inputs]

    def rows(self, index: torch.Tensor) -> Inputs:
        """Inputs at ``index``."""
        if isinstance(self.inputs, torch.Tensor):
            return self.inputs[index]
        return [self.inputs[int(i)] for i in index]

    def keep(self, mask: torch.Tensor) -> None:
        """Drop the rows where ``mask`` is False (order kept)."""
        index = mask.nonzero().flatten()
        self.ids, self.targets, self.priority = self.ids[index], self.targets[index], self.priority[index]
        self.inputs = self.rows(index) if len(index) else None

    @torch.no_grad()
    def select(self, memory: ExperienceMemory, c: int, z: torch.Tensor, index: torch.Tensor, quota: int, *,
               selection: str, experience: int, dataset: Dataset, generator: torch.Generator) -> int:
        """Choose class ``c``'s exemplars among the stored ones and the samples ``index`` of ``dataset`` (experience
        ``experience``; ``z``: their memory embeddings by dataset row); returns how many of the new ones were added.
        The stored ones are re-entered in ``memory`` with their new priority; ``generator`` draws reservoir keys."""
        old_rows = (self.targets == c).nonzero().flatten()
        old = memory.get(self.ids[old_rows].numpy())
        vectors = torch.cat([torch.from_numpy(old.vectors), z[index]])
        if selection == "herding":
            picked = herding(vectors, quota)
            priority = torch.full((len(vectors),), float("inf"))
            priority[picked] = torch.arange(len(picked), dtype=torch.float)
        else:
            fresh = torch.rand(len(index), generator=generator)
            priority = torch.cat([self.priority[old_rows], fresh])
        chosen = torch.sort(priority, stable=True).indices[:quota]
        chosen = chosen[torch.isfinite(priority[chosen])]
        from_old, from_new = chosen[chosen < len(old_rows)], chosen[chosen >= len(old_rows)] - len(old_rows)
        metadata = [{**_provenance(old.metadata[int(i)]), "priority": float(priority[i])} for i in from_old]
        metadata += [{"experience": experience, "index": int(index[j]), "priority": float(priority[len(old_rows) + j])}
                     for j in from_new]
        if len(old_rows):
            memory.remove(self.ids[old_rows].numpy())
            store_old = self.rows(old_rows[from_old])
            self.keep(self.targets != c)
        else:
            store_old = None
        if not len(chosen):
            return 0
        ids = memory.add(vectors[torch.cat([from_old, len(old_rows) + from_new])],
                         [{"kind": "exemplar", "class": c, **m} for m in metadata])
        new_inputs = _gather(dataset, index[from_new])
        inputs = new_inputs if store_old is None or not len(from_old) else _cat_inputs(store_old, new_inputs)
        self.add(ids, inputs, torch.full((len(ids),), c, dtype=torch.long), priority[chosen].clone())
        return len(from_new)

    def shrink(self, memory: ExperienceMemory, quotas: dict[int, int]) -> int:
        """Keep each class's ``quotas[c]`` best-priority exemplars (here and in ``memory``); returns how many left."""
        rank = torch.zeros(len(self), dtype=torch.long)
        for c in self.classes():  # rank of each exemplar within its class, by priority
            rows = (self.targets == c).nonzero().flatten()
            rank[rows[torch.sort(self.priority[rows], stable=True).indices]] = torch.arange(len(rows))
        keep = rank < torch.tensor([quotas.get(int(c), 0) for c in self.targets], dtype=torch.long)
        removed = self.ids[~keep].numpy()
        if len(removed):
            memory.remove(removed)
            self.keep(keep)
        return len(removed)

    def per_class(self) -> dict[str, int]:
        """Exemplars per class (keys: class ids as strings, as events and metrics hold them)."""
        return {str(c): int((self.targets == c).sum()) for c in self.classes()}

    def dataset(self) -> ArrayDataset:
        return ArrayDataset(self.inputs, self.targets)

    def get_extra_state(self) -> dict[str, Any]:
        return {"ids": self.ids, "targets": self.targets, "priority": self.priority, "inputs": self.inputs}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.ids, self.targets = state["ids"].long(), state["targets"].long()
        self.priority, self.inputs = state["priority"].float(), state["inputs"]


def _gather(dataset: Dataset, index: torch.Tensor) -> Inputs:
    """Raw inputs of ``dataset`` at ``index`` (a tensor, or a list of strings)."""
    if isinstance(dataset, ArrayDataset):
        return dataset.take(index)[0]
    items = [dataset[int(i)][0] for i in index]
    if items and isinstance(items[0], str):
        return items
    return torch.stack([torch.as_tensor(x) for x in items]) if items else torch.zeros(0)


def _cat_inputs(a: Inputs, b: Inputs) -> Inputs:
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b]) if len(b) else a
    return [*a, *b]


def _provenance(meta: dict[str, Any]) -> dict[str, Any]:
    return {"experience": meta["experience"], "index": meta.get("index")}
