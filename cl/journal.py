"""The agent's journal: what each experience taught, written to the experience memory.

After each experience, once its evaluation is known, the journal writes one ``task`` entry (the
experience's mean embedding, with its classes, the adapters it created or reused, routing statistics
and the accuracy on everything seen) and one ``prototype`` entry per class, then emits a ``journal``
event. Vectors are the strategy's ``memory_embedding`` (the pretrained backbone's, L2-normalised; task and
prototype vectors are normalised means), so entries written at different experiences stay comparable.

    agent.journal.nearest_experience(exp.train)   # -> [TaskMatch(experience=0, score=0.99, summary={...})]
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from cl.callbacks.base import Callback
from cl.data import ArrayDataset
from cl.errors import ConfigError, DataError
from cl.experience import Experience

POOL_EVENTS = ("expansion", "reuse", "adapted", "merge")


class TaskMatch(NamedTuple):
    """A past experience close to a query: its id, cosine similarity and journal summary."""

    experience: int
    score: float
    summary: dict[str, Any]


class Journal(Callback):
    """Writes a summary of every learned experience into ``agent.memory`` and answers which is nearest.

    A callback of the agent (added by ``Agent`` itself): it collects the strategy's ``expansion``/``reuse``/
    ``route``/``retrieval`` events during an experience and writes after the post-experience evaluation,
    so the checkpoint taken after the experience holds its entries.
    """

    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self._events: list[tuple[str, dict[str, Any]]] = []
        self._exp: Experience | None = None

    # ---- callback hooks -----------------------------------------------------------------------
    def before_experience(self, agent: Any, exp: Experience) -> None:
        self._exp, self._events = exp, []

    def on_event(self, agent: Any, kind: str, data: dict[str, Any]) -> None:
        if kind in (*POOL_EVENTS, "route", "retrieval"):
            self._events.append((kind, data))

    def after_eval(self, agent: Any, exps: list[Any], results: dict[str, Any]) -> None:
        if results.get("purpose") == "stream" and self._exp is not None:
            self.record(self._exp, results)
            self._exp = None

    # ---- writing --------------------------------------------------------------------------------
    @torch.no_grad()
    def record(self, exp: Experience, results: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write ``exp``'s task summary and class prototypes to the memory; emit and return the summary."""
        agent = self.agent
        z, y = agent.strategy.memory_embeddings(exp.train, desc=f"exp {exp.id} journal")
        if not len(z):
            raise DataError(f"experience {exp.id} has no training data to summarise")
        classes = sorted(int(c) for c in torch.unique(y))
        protos = torch.stack([z[y == c].mean(0) for c in classes])
        counts = [int((y == c).sum()) for c in classes]
        summary: dict[str, Any] = {"experience": exp.id, "classes": list(exp.classes), "samples": len(z)}
        summary.update(self._decisions())
        if results is not None:
            summary["accuracy_seen"] = float(results["accuracy_seen"])
            summary["accuracy"] = {str(e): float(a) for e, a in zip(results["experiences"], results["accuracy"],
                                                                   strict=True)}
        mem = agent.memory
        task_id = int(mem.add(F.normalize(z.mean(0), dim=0)[None], [{"kind": "task", **summary}])[0])
        proto_meta = [{"kind": "prototype", "experience": exp.id, "class": c, "count": n}
                      for c, n in zip(classes, counts, strict=True)]
        mem.add(F.normalize(protos, dim=1), proto_meta)
        agent.callbacks.on_event(agent, "journal", {**summary, "memory_id": task_id, "prototypes": len(classes)})
        return summary

    def _decisions(self) -> dict[str, Any]:
        """Adapters created or reused and routing statistics, from the events of the experience (if any)."""
        out: dict[str, Any] = {}
        created, reused = [], []
        for kind, data in self._events:
            if kind == "expansion":
                created.append({"layer": data.get("layer"), "adapter": data.get("adapter")})
            elif kind == "reuse":
                reused.append({"layer": data.get("layer")})
            elif kind == "adapted":
                created += [{"layer": layer, "adapter": data.get("adapter")} for layer in data.get("layers", [])]
        if created or reused:
            out["adapters"] = {"created": created, "reused": reused}
        usage: dict[str, float] = defaultdict(float)
        hits = queries = 0.0
        for kind, data in self._events:
            if kind == "route" and isinstance(data.get("usage"), dict):
                for name, w in data["usage"].items():
                    usage[str(name)] += float(w)
            elif kind == "retrieval" and data.get("queries"):
                hits, queries = hits + float(data.get("hits", 0)), queries + float(data["queries"])
        routing: dict[str, Any] = {}
        if usage:
            total = sum(usage.values()) or 1.0
            routing["usage"] = {k: v / total for k, v in sorted(usage.items())}
        if queries:
            routing["hit_rate"] = hits / queries
        if routing:
            out["routing"] = _jsonable(routing)
        return _jsonable(out)

    # ---- reading --------------------------------------------------------------------------------
    def nearest_experience(self, query: Any, k: int = 1) -> list[TaskMatch]:
        """The ``k`` past experiences whose mean embedding is closest (cosine) to ``query``, best first.

        ``query``: an ``Experience`` (its training data), a dataset, raw inputs (images ``[N, C, H, W]`` or
        strings), embeddings ``[N, D]`` (averaged) or one embedding ``[D]`` in the memory's space
        (``memory_embedding``).
        """
        vec = self.query_vector(query)
        hits = self.agent.memory.search(vec[None], k, kind="task")[0]
        return [TaskMatch(int(h.metadata["experience"]), h.score, _summary(h.metadata)) for h in hits]

    def query_vector(self, query: Any) -> np.ndarray:
        """The normalised mean embedding ``[D]`` that ``nearest_experience`` searches with."""
        dim = self.agent.memory.dim
        if isinstance(query, Experience):
            query = query.train
        if isinstance(query, list) or (isinstance(query, torch.Tensor) and query.ndim >= 3):
            query = ArrayDataset(query, torch.zeros(len(query), dtype=torch.long))
        if isinstance(query, Dataset):
            z, _ = self.agent.strategy.memory_embeddings(query, desc="journal query")
        else:
            z = torch.as_tensor(np.asarray(query, dtype=np.float32))
            if z.ndim == 1:
                z = z[None]
            if z.ndim != 2 or z.shape[1] != dim:
                raise ConfigError(f"nearest_experience takes an experience, a dataset, raw inputs or embeddings "
                                  f"[N, {dim}] / [{dim}]; got an array of shape {tuple(z.shape)}")
            z = F.normalize(z.float(), dim=1)
        if not len(z):
            raise DataError("nearest_experience got an empty query")
        return F.normalize(z.mean(0), dim=0).numpy()

    def summaries(self) -> list[dict[str, Any]]:
        """The task summaries in the memory, in experience order."""
        entries = self.agent.memory.entries("task")
        return sorted((_summary(m) for m in entries.metadata), key=lambda m: m["experience"])


def _summary(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if k not in ("kind", "class", "adapter")}


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "tolist"):
        return x.tolist()
    return x
