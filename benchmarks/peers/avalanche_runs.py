"""Avalanche 0.6's own strategies on our stream, with our pretrained trunk and preprocessing.

The model is our backbone object (the same weights and preprocessing) followed by Avalanche's
``IncrementalClassifier``, trained end to end by the strategy. Images go through the backbone's ``prepare``
(resize, grey repeated to 3 channels, normalised, channels-last). Texts are tokenised once, before Avalanche
sees them, by the backbone's own tokenizer (:class:`TokenizedText`): Avalanche moves every part of a
mini-batch with ``.to(device)`` and concatenates replay batches, which strings do not survive; the model
trims each batch to its longest text, so it computes exactly what ``prepare`` on the strings would.
Accuracy is measured by us after every experience on every seen test set, the same way our engine does, so
the matrices are comparable.
"""

from __future__ import annotations

import dataclasses
import random
import time
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from benchmarks.peers.grid import AVALANCHE_METHODS, AVALANCHE_TRAINING, RunSpec
from cl.backbones.base import Backbone
from cl.data import targets_of
from cl.experience import Stream
from cl.registry import BACKBONES, SCENARIOS
from scenarios.sources.avalanche import to_avalanche


class TokenizedText(Dataset):
    """Items ``(text, y)`` of ``dataset`` as ``(tokens [2, max_length], y)``: input ids and attention mask,
    padded to the backbone's ``max_length`` (cut there, as ``prepare`` cuts); keeps ``targets``."""

    def __init__(self, dataset: Dataset, backbone: Backbone) -> None:
        texts = [dataset[i][0] for i in range(len(dataset))]  # type: ignore[arg-type]
        tok = backbone.tokenizer(texts, padding="max_length", truncation=True,  # type: ignore[operator]
                                 max_length=backbone.data_config.max_length, return_tensors="pt")
        self.tokens = torch.stack([tok["input_ids"], tok["attention_mask"]], dim=1)
        self.targets = targets_of(dataset)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.tokens[i], int(self.targets[i])


def tokenized(stream: Stream, backbone: Backbone) -> Stream:
    """``stream`` with every train and test set tokenised by ``backbone`` (:class:`TokenizedText`)."""
    exps = [dataclasses.replace(e, train=TokenizedText(e.train, backbone), test=TokenizedText(e.test, backbone))
            for e in stream]
    return dataclasses.replace(stream, experiences=exps)


class TrunkClassifier(nn.Module):
    """Our backbone + an Avalanche ``IncrementalClassifier`` over its embedding, all of it trainable.

    Inputs: images (the backbone's ``prepare`` runs here) or, for a text backbone, :class:`TokenizedText`
    items ``[B, 2, max_length]``, trimmed to the batch's longest text; a text trunk trains with gradient
    checkpointing (lower peak memory, the same gradients, one more forward pass per step).
    """

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        from avalanche.models import IncrementalClassifier

        self.backbone = backbone.requires_grad_(True)
        self.classifier = IncrementalClassifier(backbone.embed_dim, initial_out_features=2)
        if backbone.data_config.modality == "text":
            # recompute each layer's activations in the backward pass (same gradients, dropout replayed):
            # a MiniLM batch of 64 x 128 tokens otherwise holds ~1.5 GB of activations
            backbone.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backbone.data_config.modality == "text":
            length = int(x[:, 1].sum(1).max())
            state = (x[:, 0, :length].contiguous(), x[:, 1, :length].contiguous())
        else:
            state = self.backbone.prepare(x)
        return self.classifier(self.backbone(state))


@torch.no_grad()
def evaluate(model: nn.Module, datasets: list[Dataset], batch_size: int = 64) -> tuple[list[float], float]:
    """Accuracy on each dataset and over their union (``accuracy_seen``)."""
    model.eval()
    correct, counts = [], []
    for ds in datasets:
        ok = n = 0
        for x, y in DataLoader(ds, batch_size=batch_size):
            ok += int((model(x).argmax(1) == y).sum())
            n += len(y)
        correct.append(ok)
        counts.append(n)
    return [c / n for c, n in zip(correct, counts, strict=True)], sum(correct) / sum(counts)


def make_strategy(method: str, model: nn.Module) -> Any:
    """An Avalanche strategy from ``AVALANCHE_METHODS`` with our training settings and no loggers."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import avalanche.training as training
        from avalanche.training.plugins import EvaluationPlugin

    name, extra = AVALANCHE_METHODS[method]
    t = AVALANCHE_TRAINING
    opt = torch.optim.SGD(model.parameters(), lr=t["lr"], momentum=t["momentum"])
    return getattr(training, name)(
        model=model, optimizer=opt, criterion=nn.CrossEntropyLoss(), train_mb_size=t["train_mb_size"],
        train_epochs=t["train_epochs"], eval_mb_size=256, device="cpu", evaluator=EvaluationPlugin(loggers=[]),
        **extra,
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_avalanche(spec: RunSpec, stream: Stream | None = None) -> dict[str, Any]:
    """Train ``spec.method`` on the stream of ``spec.scenario``; the accuracy matrix and headline metrics."""
    from cl.metrics import summarize

    stream = stream or SCENARIOS.create(spec.scenario["name"], **{k: v for k, v in spec.scenario.items()
                                                                   if k != "name"})
    seed_everything(spec.seed)
    backbone = BACKBONES.create(spec.backbone["name"], **{k: v for k, v in spec.backbone.items() if k != "name"})
    model = TrunkClassifier(backbone)
    strategy = make_strategy(spec.method, model)
    if backbone.data_config.modality == "text":
        stream = tokenized(stream, backbone)
    benchmark = to_avalanche(stream)
    rows, seen, t0 = [], [], time.perf_counter()
    for i, (avl_exp, exp) in enumerate(zip(benchmark.train_stream, stream, strict=True)):
        assert list(avl_exp.classes_in_this_experience) == list(exp.classes)
        strategy.train(avl_exp)
        accs, acc_seen = evaluate(model, [e.test for e in stream.experiences[: i + 1]])
        rows.append(accs)
        seen.append(acc_seen)
        print(f"{spec.key} exp {exp.id}: accuracy on all seen {100 * acc_seen:.1f}", flush=True)
    return {"accuracy_matrix": rows, "accuracy_seen": seen, **summarize(rows, seen),
            "run_wall_s": round(time.perf_counter() - t0, 1),
            "params_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
