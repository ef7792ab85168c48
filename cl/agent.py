"""``Agent``: a backbone, a strategy and callbacks that learn a stream one experience at a time.

``cl run`` is a thin wrapper over this class; a notebook user drives it directly::

    agent = Agent(backbone="efficientnet_lite0", strategy="simplecil", out="runs/x")
    for exp in stream:
        agent.learn(exp)
    agent.predict(images)
    agent.journal.nearest_experience(new_exp)   # which past experience is closest to this one?

The agent owns one ``ExperienceMemory`` (``agent.memory``, built from ``memory=``, the run config's ``memory:``
section, and lent to the strategy: ``strategy.memory``): the journal writes a task summary and class prototypes
into it after each experience, strategies may add their own entries (e.g. replay exemplars, adapter keys), and
``cl run`` saves it to ``RUN/memory`` (``memory.path``) with each checkpoint.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pydantic
import torch

from cl import distributed as dist
from cl.allocator import tune_allocator
from cl.backbones import Backbone, create_backbone, resolve_timm_name
from cl.cache import PrefixCache
from cl.callbacks.base import Callback, CallbackList
from cl.checkpoint import load_checkpoint, load_memory, payload_problem, save_checkpoint, save_memory
from cl.context import Context
from cl.data import ArrayDataset, iterate_batches, subset
from cl.errors import CheckpointError, ConfigError, TrainingError
from cl.experience import Experience
from cl.journal import Journal
from cl.memory import ExperienceMemory, MemoryConfig
from cl.metrics import MetricsCallback
from cl.plugins import import_plugins, source_of
from cl.progress import Progress, library_bars
from cl.registry import BACKBONES, STRATEGIES, format_validation_error
from cl.seed import resolve_device, seed_everything
from cl.strategy import Strategy


class Agent:
    """Learns a stream: runs each experience through the strategy's hooks, evaluates every
    experience seen so far, and lets callbacks record metrics, events and checkpoints.

    Args:
        backbone: a registered backbone name or a ``Backbone``.
        strategy: a registered strategy name or a ``Strategy`` built on the backbone.
        backbone_params / strategy_params: keyword parameters for the registry entries.
        callbacks: callbacks, called in order (metrics before checkpointing).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        seed: run seed; each experience reseeds from (seed, experience id).
        task_aware: evaluate with the task label known (task-incremental streams).
        rank / world_size: this process's place in a distributed run (``cl.distributed``; ``cl run`` sets them).
        journal: write a summary of each experience into ``memory`` (``agent.journal``).
        memory: the experience memory's settings (``MemoryConfig`` or its dict: index, metric, budget, path).
        threads: CPU threads torch uses (``torch.set_num_threads``, for the whole process); None leaves them as they
            are.

    After each ``learn``, ``metrics()`` gives what ``cl run`` writes to ``metrics.json``: the accuracy matrix, average
    incremental accuracy, final accuracy, forgetting, BWT, parameters and cost (docs/metrics.md).
    """

    def __init__(
        self,
        backbone: str | Backbone = "efficientnet_lite0",
        strategy: str | Strategy = "simplecil",
        *,
        backbone_params: dict[str, Any] | None = None,
        strategy_params: dict[str, Any] | None = None,
        callbacks: Sequence[Callback] | None = None,
        device: str = "auto",
        seed: int = 0,
        deterministic: bool = True,
        task_aware: bool = False,
        eval_batch_size: int = 256,
        progress: bool = True,
        cache_max_gb: float = 8.0,
        rank: int = 0,
        world_size: int = 1,
        journal: bool = True,
        memory: MemoryConfig | dict[str, Any] | None = None,
        threads: int | None = None,
    ) -> None:
        tune_allocator()
        if threads is not None:
            if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
                raise ConfigError(f"threads must be an int >= 1 (CPU threads for torch) or None, got {threads!r}")
            torch.set_num_threads(threads)
        self.spec = {
            "backbone": backbone if isinstance(backbone, str) else None,
            "backbone_params": dict(backbone_params or {}),
            "strategy": strategy if isinstance(strategy, str) else None,
            "strategy_params": dict(strategy_params or {}),
        }
        self.seed, self.deterministic, self.task_aware = seed, deterministic, task_aware
        seed_everything(seed, deterministic=deterministic)
        self.progress = Progress(enabled=progress)
        if isinstance(strategy, Strategy):
            self.strategy = strategy
        else:
            with library_bars(self.progress.enabled):  # progress=False silences the libraries' loading bars too
                bb = create_backbone(backbone, **(backbone_params or {})) if isinstance(backbone, str) else backbone
            self.strategy = STRATEGIES.create(strategy, bb, **(strategy_params or {}))
        self.backbone: Backbone = self.strategy.backbone
        self.memory_config = memory_config(memory)
        self.memory = self.memory_config.build(self.backbone.embed_dim)
        self.journal: Journal | None = Journal(self) if journal else None
        callbacks = list(callbacks or [])
        found = next((c for c in callbacks if isinstance(c, MetricsCallback)), None)
        self.metrics_callback: MetricsCallback = found or MetricsCallback()
        # the journal, then the metrics callback the caller did not give, go last: earlier callbacks keep their
        # positions (and checkpointed state keys)
        self.callbacks = CallbackList([*callbacks, *([self.journal] if self.journal else []),
                                       *([] if found else [self.metrics_callback])])
        self.device = resolve_device(device)
        self.seen: list[Experience] = []
        self._shards: dict[int, tuple[Any, Any]] = {}  # id(test set) -> (test set, this rank's shard of it)
        self.ctx = Context(
            device=self.device, callbacks=self.callbacks, agent=self, progress=self.progress,
            cache=PrefixCache(int(cache_max_gb * 2**30)), seed=seed, rank=rank, world_size=world_size,
            eval_batch_size=eval_batch_size, memory=self.memory,
        )
        self.strategy.bind(self.ctx)

    # ---- learning ---------------------------------------------------------------------------
    def learn(self, exp: Experience, future: Sequence[Experience] = ()) -> dict[str, Any]:
        """Train on one experience, then evaluate every experience seen so far (and ``future``)."""
        if any(e.id == exp.id for e in self.seen):
            raise ConfigError(f"experience {exp.id} was already learned by this agent")
        seed_everything(self.seed, exp.id, deterministic=self.deterministic)
        cb, strat = self.callbacks, self.strategy
        self.ctx.check_stop(f"before experience {exp.id}")
        self.ctx.last_resume_point = time.monotonic()  # the experience checkpoint is the latest resume point
        cb.before_experience(self, exp)
        strat.before_experience(exp)
        if strat.experience is not exp:
            raise TrainingError(f"{type(strat).__name__}.before_experience did not call "
                                "super().before_experience(exp), which records the experience and its classes and "
                                "lends the memory: call it first")
        with self.ctx.phase("train"):  # a strategy marks finer phases inside (cl.phases)
            strat.fit(exp)
        if (missed := strat.loops.resume) is not None:
            raise CheckpointError(f"the resume point of experience {exp.id} (training loop {missed['call']}) "
                                  "was never reached when the experience ran again: delete checkpoints/partial-* "
                                  "and resume, to repeat the experience from its start")
        with self.ctx.phase("head_update"):
            strat.after_experience(exp)
        if dist.is_distributed():
            self.sync()
        self.seen.append(exp)
        cb.after_training(self, exp)
        with self.ctx.phase("evaluation"):
            results = self.evaluate([*self.seen, *future], purpose="stream")
        cb.after_experience(self, exp)
        return results

    def metrics(self) -> dict[str, Any]:
        """The metrics of the experiences learned so far, as ``cl run`` writes them to ``metrics.json``:
        ``accuracy_matrix`` (row i: accuracy on experiences 0..i after learning i), ``accuracy_seen``,
        ``avg_incremental_accuracy``, ``final_accuracy``, ``avg_forgetting``, ``forgetting_per_experience``, ``bwt``,
        ``fwt``, parameters, wall time and peak memory (definitions: docs/metrics.md)."""
        return self.metrics_callback.metrics(self)

    @torch.no_grad()
    def evaluate(self, exps: Sequence[Experience], purpose: str = "user") -> dict[str, Any]:
        """Accuracy on each experience's test set, and over their union (``accuracy_seen``).

        ``accuracy_seen`` covers the experiences already learned; later ones (``future``) are
        reported per experience only.
        """
        self.callbacks.before_eval(self, list(exps))
        strat = self.strategy
        strat.eval()
        correct, counts = [], []
        for exp in exps:
            self.ctx.check_stop(f"before evaluating experience {exp.id}")
            ok = n = 0
            test = self._shard(exp.test)
            for scores, y in strat.score_batches(test, self.ctx.eval_batch_size, desc=f"eval exp {exp.id}"):
                if self.task_aware:
                    keep = torch.full_like(scores, float("-inf"))
                    keep[:, exp.classes] = 0
                    scores = scores + keep
                ok += int((scores.argmax(1).cpu() == y).sum())
                n += len(y)
            correct.append(ok)
            counts.append(n)
        if dist.is_distributed():  # each rank evaluated its shard of every test set
            total = dist.all_sum([*correct, *counts])
            correct, counts = [int(v) for v in total[: len(exps)]], [int(v) for v in total[len(exps) :]]
        accs = [ok / max(n, 1) for ok, n in zip(correct, counts, strict=True)]
        seen_ids = {e.id for e in self.seen}
        c = sum(k for k, e in zip(correct, exps, strict=True) if e.id in seen_ids)
        t = sum(k for k, e in zip(counts, exps, strict=True) if e.id in seen_ids)
        results = {
            "purpose": purpose, "experiences": [e.id for e in exps], "accuracy": accs,
            "correct": correct, "count": counts, "accuracy_seen": c / t if t else float("nan"),
        }
        self.callbacks.after_eval(self, list(exps), results)
        return results

    def _shard(self, dataset: Any) -> Any:
        """This rank's contiguous shard of a test set (the set itself in one process); one object per set, so
        the prefix cache keeps the shard's states across evaluations."""
        if not dist.is_distributed():
            return dataset
        if id(dataset) not in self._shards:
            rows = dist.local_rows(len(dataset))
            self._shards[id(dataset)] = (dataset, subset(dataset, range(rows.start, rows.stop)))
        return self._shards[id(dataset)][1]

    def sync(self) -> dict[str, Any]:
        """Distributed runs: check every rank holds the same strategy state and memory after an experience (rank
        0's state replaces any rank's that drifted) and record the check as a ``sync`` event."""
        state = self.strategy.checkpoint_state()
        checksums = dist.same_on_all_ranks(state)
        identical = len(set(checksums)) == 1
        if not identical:
            self.strategy.load_checkpoint_state(dist.broadcast(state))
        entries = dist.all_gather(len(self.memory))
        info = {"checksums": checksums, "identical": identical, "memory_entries": entries}
        self.strategy.emit("sync", **info, world_size=dist.world_size())
        if len(set(entries)) > 1:
            raise TrainingError(f"ranks hold different experience memories ({entries} entries): every memory write "
                              "must happen on every rank (see docs/distributed.md)")
        return info

    @torch.no_grad()
    def predict(self, inputs: torch.Tensor | list[str], batch_size: int | None = None) -> torch.Tensor:
        """Predicted global class ids for raw inputs (images ``[N, C, H, W]`` or strings), batched."""
        bs = batch_size or self.ctx.eval_batch_size
        ds = ArrayDataset(inputs, torch.zeros(len(inputs), dtype=torch.long))
        preds = [self.strategy.predict(x) for x, _ in iterate_batches(ds, bs)]
        return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)

    # ---- persistence ------------------------------------------------------------------------
    def checkpoint_payload(self) -> dict[str, Any]:
        """What a checkpoint holds: strategy state, callback state, experiences done."""
        return {
            "experiences_done": [e.id for e in self.seen],
            "strategy": self.strategy.checkpoint_state(),
            "callbacks": self.callbacks.state_dict(),
            "spec": self.spec,
        }

    def restore(
        self, payload: dict[str, Any], stream: Sequence[Experience], memory_dir: str | Path | None = None,
        source: str | Path | None = None,
    ) -> list[int]:
        """Load a checkpoint payload and the memory saved with it from ``memory_dir``; ``seen`` is rebuilt
        from ``stream``. Returns the ids done. ``source``: the file the payload came from, named in errors."""
        where = f"checkpoint {source}" if source is not None else "the checkpoint"
        if (problem := payload_problem(payload, ("strategy", "callbacks"))) is not None:
            raise CheckpointError(f"{where} is not a valid clagent checkpoint: {problem}")
        done = list(payload["experiences_done"])
        by_id = {e.id: e for e in stream}
        missing = [i for i in done if i not in by_id]
        if missing:
            raise CheckpointError(f"{where} has experiences {missing} that the stream does not")
        if payload.get("memory") is not None:
            if memory_dir is None:
                raise CheckpointError("this checkpoint was saved with an experience memory: pass memory_dir "
                                      "(the run's memory/ folder) to restore it")
            self.use_memory(load_memory(memory_dir, payload["memory"]))
        try:
            self.strategy.load_checkpoint_state(payload["strategy"])
            self.callbacks.load_state_dict(payload["callbacks"])
        except CheckpointError as e:
            raise CheckpointError(f"{where}: {e}") from None
        self.seen = [by_id[i] for i in done]
        return done

    def use_memory(self, memory: ExperienceMemory) -> None:
        """Replace the agent's experience memory (e.g. by a loaded one, which takes the agent's budget) and lend it to
        the strategy (``Strategy.use_memory``)."""
        if memory.dim != self.backbone.embed_dim:
            raise CheckpointError(f"the experience memory holds {memory.dim}-d vectors, this agent's backbone "
                                  f"embeds to {self.backbone.embed_dim}: it belongs to another backbone")
        memory.budget = self.memory_config.budget
        self.memory = memory
        self.strategy.use_memory(memory)

    def save_memory(self, directory: str | Path) -> dict[str, Any]:
        """Save ``memory`` atomically to ``directory``; returns what a checkpoint records to find it again."""
        return save_memory(self.memory, directory)

    def save(self, path: str | Path) -> Path:
        """Save the agent (strategy state, experience memory and how to rebuild them) to a directory."""
        if self.spec["strategy"] is None or self.spec["backbone"] is None:
            raise ConfigError("Agent.save needs an agent built from registry names (backbone=..., strategy=...)")
        path = Path(path)
        memory = self.save_memory(path / "memory")
        save_checkpoint(path, {**self.checkpoint_payload(), "callbacks": {}, "memory": memory}, name="agent")
        spec = {**self.spec, "seed": self.seed, "memory": self.memory_config.model_dump(),
                "imports": self._imports()}
        (path / "agent_spec.json").write_text(json.dumps(spec, indent=2))
        return path

    def _imports(self) -> list[str]:
        """What to import so that this agent's backbone and strategy names are registered (``plugins.source_of``):
        recorded by ``save`` so that ``load`` can name it."""
        entries = [BACKBONES.get(self.spec["backbone"]) if self.spec["backbone"] in BACKBONES else None,
                   STRATEGIES.get(self.spec["strategy"])]
        return list(dict.fromkeys(s for e in entries if e is not None and (s := source_of(e)) is not None))

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", imports: Sequence[str] = (), **kwargs: Any) -> Agent:
        """Rebuild an agent saved with ``save``, with its memory (its seen experiences are not restored).

        Nothing in the directory runs: the spec is JSON naming registered components, the checkpoint tensors and
        plain data, the memory JSON, SQLite and FAISS files. A strategy (or backbone) of your own must be registered
        first: ``imports`` (module names or ``.py`` files, as ``cl run --import`` takes them) are imported before the
        agent is built, which confirms that you trust them; the saved agent records which module registered its
        strategy, and an error names it when it is not imported."""
        path = Path(path)
        spec_file = path / "agent_spec.json"
        if not spec_file.exists():
            raise CheckpointError(f"{path} is not a saved agent (no agent_spec.json)")
        spec = _read_spec(spec_file)
        import_plugins(imports)
        _check_registered(path, spec)
        payload = load_checkpoint(path, name="agent", require=("strategy",))
        agent = cls(
            spec["backbone"], spec["strategy"], backbone_params=spec["backbone_params"],
            strategy_params=spec["strategy_params"], device=device, seed=spec["seed"],
            **{"memory": spec.get("memory"), **kwargs},  # an agent saved before the memory had settings: defaults
        )
        if payload.get("memory") is not None:
            agent.use_memory(load_memory(path / "memory", payload["memory"]))
        try:
            agent.strategy.load_checkpoint_state(payload["strategy"])
        except CheckpointError as e:
            raise CheckpointError(f"saved agent {path}: {e}") from None
        return agent


_SPEC_TYPES = {"backbone": str, "strategy": str, "backbone_params": dict, "strategy_params": dict, "seed": int}


def _check_registered(path: Path, spec: dict[str, Any]) -> None:
    """Raise CheckpointError naming what to import when a saved agent's strategy or backbone is not registered."""
    recorded = spec.get("imports", [])
    for kind, registered in (("strategy", spec["strategy"] in STRATEGIES),
                             ("backbone", spec["backbone"] in BACKBONES or resolve_timm_name(spec["backbone"]))):
        if registered:
            continue
        name = spec[kind]
        files = [s for s in recorded if s != "__main__"]
        if files:
            where = (f"it is registered by {', '.join(files)}, which is not imported; a saved agent runs no code by "
                     f"itself: if you trust that code, load with Agent.load({str(path)!r}, imports={files!r})")
        elif recorded:
            where = ("it was defined in the script or notebook that saved the agent (__main__): run that definition "
                     "before Agent.load")
        else:
            where = (f"import the module that registers it first (Agent.load({str(path)!r}, imports=[...]), or "
                     "import it yourself)")
        raise CheckpointError(f"saved agent {path} uses {kind} {name!r}, which is not registered: {where}")


def memory_config(memory: MemoryConfig | dict[str, Any] | None) -> MemoryConfig:
    """The memory settings ``Agent(memory=...)`` takes, checked (ConfigError naming the bad key)."""
    if isinstance(memory, MemoryConfig):
        return memory
    try:
        return MemoryConfig(**(memory or {}))
    except pydantic.ValidationError as e:
        raise ConfigError(format_validation_error(e, "the memory settings", MemoryConfig)) from None


def _read_spec(spec_file: Path) -> dict[str, Any]:
    """A saved agent's ``agent_spec.json``, checked: registry names, their params, the seed."""
    try:
        spec = json.loads(spec_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{spec_file} is unreadable ({e})") from None
    if not isinstance(spec, dict):
        raise CheckpointError(f"{spec_file} does not hold a saved agent's spec (a JSON object)")
    bad = [f"{k} ({t.__name__})" for k, t in _SPEC_TYPES.items() if not isinstance(spec.get(k), t)]
    imports = spec.get("imports", [])
    if not (isinstance(imports, list) and all(isinstance(s, str) for s in imports)):
        bad.append("imports (list of str)")
    if bad:
        raise CheckpointError(f"{spec_file} is missing or mistypes {', '.join(bad)}")
    return spec
