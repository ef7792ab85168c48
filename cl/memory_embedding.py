"""The experience memory's embedding: the pretrained backbone's, whatever a strategy trains.

Vectors written to the memory at different experiences (task summaries, prototypes, exemplars) must stay
comparable, so they are embedded by the backbone as constructed: adapters off, and every backbone entry that
training, a merge or a checkpoint changed swapped back to its pretrained value (kept by ``keep_pretrained`` just
before the change). ``MemoryEmbedding`` gives a strategy ``memory_embedding(state)`` and
``memory_embeddings(dataset)`` (docs/memory.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from cl import distributed as dist
from cl.adapters import pools
from cl.backbones.state import State, to_device
from cl.routing import adapters_off


class MemoryEmbedding:
    """Strategy mixin (``cl.strategy.Strategy`` has it): the pretrained backbone, kept reachable while training
    changes it, and the memory's embedding on it. Uses the strategy's ``backbone``, ``frozen_depth``,
    ``states``, ``iterate_states`` and ``ctx``; ``_pristine`` (entries still as constructed), ``_pretrained`` (the
    pretrained values of the others) and ``_embedded`` (the last ``memory_embeddings``) are set up by
    ``Strategy.__init__``."""

    def keep_pretrained(self, names: set[str]) -> None:
        """Record that the entries ``names`` of the state dict are about to change (training, a merge into the
        weights, a checkpoint): checkpoints keep them, and ``memory_embedding`` keeps running on their pretrained
        values."""
        if names & self._pristine:
            entries = {**dict(self.named_parameters()), **dict(self.named_buffers())}
            for n in names & self._pristine:
                if n in entries:
                    self._pretrained[n] = entries[n].detach().clone()
            self._pristine -= names

    @contextmanager
    def pretrained(self) -> Iterator[None]:
        """Run the backbone as constructed: adapters off, trained entries swapped back to their pretrained values."""
        entries = {**dict(self.named_parameters()), **dict(self.named_buffers())}
        swapped: dict[str, torch.Tensor] = {}
        try:
            for name, value in self._pretrained.items():
                t = entries[name]
                swapped[name] = t.data
                t.data = value.to(t.device, t.dtype)
            with adapters_off(pools(self.backbone)):
                yield
        finally:
            for name, data in swapped.items():
                entries[name].data = data

    @torch.no_grad()
    def memory_embedding(self, state: State) -> torch.Tensor:
        """The memory's embedding ``[B, embed_dim]`` of prefix states: the pretrained backbone's, L2-normalised.

        Frozen by construction, so vectors written to the experience memory at different experiences (task
        summaries, prototypes, exemplars) stay comparable whatever the strategy trained since.
        """
        with self.pretrained():
            return F.normalize(self.backbone.forward_from(state, self.frozen_depth).float(), dim=1)

    @torch.no_grad()
    def pretrained_embeddings(self, dataset: Dataset, desc: str = "pretrained embeddings") -> torch.Tensor | None:
        """The pretrained backbone's embeddings ``[N, embed_dim]`` (float, not normalised; on the context's device)
        of every item of ``dataset``, in order; None when its prefix states are not cached (augmented data,
        ``cache_prefix`` off).

        They never change, so they are computed once, from the cached prefix states in batches of
        ``ctx.eval_batch_size`` (the same batches as ``iterate_states``, so the same values), and kept with those
        states: the memory's embeddings, and the frozen features adapter strategies route and classify with, of a
        data set cost one pass however often they are asked for.
        """
        cached = self.states(dataset)
        if cached is None:
            return None
        if "pretrained" not in cached.derived:
            was = self.training
            self.eval()
            batches = cached.batches(self.ctx.eval_batch_size)
            if self.ctx.progress is not None:
                batches = self.ctx.progress(batches, -(-len(cached) // self.ctx.eval_batch_size), desc)
            chunks = []
            with self.pretrained():
                for state, _ in batches:
                    state = to_device(state, self.ctx.device)
                    chunks.append(self.backbone.forward_from(state, self.frozen_depth).float())
            self.train(was)
            dim = self.backbone.embed_dim
            cached.derived["pretrained"] = torch.cat(chunks) if chunks else torch.zeros(0, dim, device=self.ctx.device)
        return cached.derived["pretrained"]

    @torch.no_grad()
    def memory_embeddings(self, dataset: Dataset, desc: str = "embeddings") -> tuple[torch.Tensor, torch.Tensor]:
        """``memory_embedding`` of every item of ``dataset`` ``[N, D]`` (CPU, in order) and its targets ``[N]``.

        The last dataset's are kept until the next experience, so the replay buffer and the journal share one pass.
        In a distributed run each rank embeds its shard and every rank gets all rows.
        """
        if self._embedded is not None and self._embedded[0] is dataset:
            return self._embedded[1], self._embedded[2]
        if (z := self.pretrained_embeddings(dataset, desc)) is not None:  # cached: every rank has every row
            self._embedded = (dataset, F.normalize(z, dim=1).cpu(), self.states(dataset).targets.cpu())
            return self._embedded[1], self._embedded[2]
        was = self.training
        self.eval()
        z, y = [], []
        rows = dist.local_rows(len(dataset)) if dist.is_distributed() else None
        for state, target in self.iterate_states(dataset, self.ctx.eval_batch_size, desc=desc, rows=rows):
            z.append(self.memory_embedding(state).cpu())
            y.append(target.cpu())
        self.train(was)
        dim = self.backbone.embed_dim
        out = (torch.cat(z) if z else torch.zeros(0, dim), torch.cat(y) if y else torch.zeros(0, dtype=torch.long))
        out = (dist.gather_rows(out[0]), dist.gather_rows(out[1]))
        self._embedded = (dataset, *out)
        return out
