"""The official side of ``benchmarks.official``: their ``Learner`` classes driven through their own functions.

SEMA (``models.sema.Learner``): built by their ``SEMAVitNet`` / ``get_backbone`` / ``vit_base_patch16_224_sema``
path from the CIFAR config (``exps/sema_cifar.json``); a first task through their ``incremental_train``; the
timed later task through ``incremental_train`` again (detection, ``_train_new``: ``_init_train`` for the adapter
epochs then for the descriptor epochs, re-detection, ``end_of_task_training``); inference through ``_eval_cnn``.
MOS (``models.mos.Learner``): built by ``MOSNet`` from ``exps/mos_cifar.json``; T tasks' adapters added with their
``adapter_update`` (no training); inference through ``_eval_cnn`` (T + 1 passes, self-refinement per image).

Data comes from ``DataManager``, a stand-in for theirs that serves random normalised tensors as
``(index, image, label)`` items, the way their datasets do. Everything here must run inside
``checkouts.official_code``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from benchmarks.official.checkouts import quiet_module, silent
from benchmarks.official.ours import Sizes, labels

#: exps/sema_cifar.json at 5a45512, with device cpu; batch, epochs and the expansion threshold are set per run
SEMA_ARGS: dict[str, Any] = {
    "prefix": "reproduce", "dataset": "cifar224", "memory_size": 0, "memory_per_class": 0, "fixed_memory": False,
    "shuffle": True, "model_name": "sema", "backbone_type": "pretrained_vit_b16_224_adapter", "device": ["cpu"],
    "seed": [1993], "batch_size": 32, "weight_decay": 0.0005, "min_lr": 0, "ffn_adapter_type": "adaptmlp",
    "ffn_num": 16, "optimizer": "sgd", "vpt_type": "shallow", "prompt_token_num": 5, "func_epoch": 5,
    "rd_epoch": 20, "init_lr": 0.005, "rd_lr": 0.01, "rd_dim": 128, "buffer_size": 500, "detect_batch_size": 128,
    "exp_threshold": 2, "adapt_start_layer": 9, "adapt_end_layer": 11,
}

#: exps/mos_cifar.json at 8d5e07c, with device cpu; the batch is set per run
MOS_ARGS: dict[str, Any] = {
    "prefix": " ", "dataset": "cifar224", "memory_size": 0, "memory_per_class": 0, "fixed_memory": False,
    "shuffle": True, "model_name": "mos", "backbone_type": "vit_base_patch16_224_mos", "device": ["cpu"],
    "seed": [1993], "tuned_epoch": 20, "init_lr": 0.03, "batch_size": 48, "weight_decay": 0.0005, "min_lr": 0,
    "optimizer": "sgd", "scheduler": "cosine", "reinit_optimizer": True, "init_milestones": [10],
    "init_lr_decay": 0.1, "reg": 0.1, "adapter_momentum": 0.1, "ensemble": True, "crct_epochs": 30,
    "ca_lr": 0.005, "ca_storage_efficient_method": "covariance", "n_centroids": 10, "pretrained": True,
    "drop": 0.0, "drop_path": 0.0, "ffn_num": 16,
}


class RandomImages(Dataset):
    """Normalised images as their datasets yield them: ``(index, image [3, H, W] float, label)``."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        self.images = images
        self.labels = targets.numpy()  # MOS reads dataset.labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, int]:
        return i, self.images[i], int(self.labels[i])


def normalised(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> what their transforms give (ToTensor, then normalised to about [-1, 1])."""
    return (images.float() / 255 - 0.5) / 0.5


class DataManager:
    """The part of their ``utils.data_manager.DataManager`` that ``incremental_train`` uses, over given images:
    task ``t``'s train split is ``images[t]``; test splits are 2 images per task (built, never evaluated)."""

    def __init__(self, images: dict[int, torch.Tensor], classes: int, tasks: int) -> None:
        self.classes, self.nb_tasks, self.nb_classes = classes, tasks, tasks * classes
        self.train = {t: RandomImages(normalised(x), labels(len(x), t, classes)) for t, x in images.items()}

    def get_task_size(self, task: int) -> int:
        return self.classes

    def get_dataset(self, indices: np.ndarray, source: str, mode: str, ret_data: bool = False) -> RandomImages:
        task = int(indices[-1]) // self.classes
        if source == "train":
            return self.train[task]
        x = self.train[task].images[:2]
        return RandomImages(x, torch.as_tensor(self.train[task].labels[:2]))


def loader(images: torch.Tensor, batch: int) -> DataLoader:
    """Their evaluation loader over random images (no shuffling, no worker processes)."""
    return DataLoader(RandomImages(normalised(images), torch.zeros(len(images), dtype=torch.long)),
                      batch_size=batch, shuffle=False, num_workers=0)


class Captured(Exception):
    """Raised to stop their training code at a point whose state a case needs."""


# ---- SEMA -----------------------------------------------------------------------------------------------
class TheirSEMA:
    """Their SEMA learner in the states the cases need. Construct inside ``official_code``."""

    def __init__(self, sizes: Sizes) -> None:
        import backbone.sema_block as sema_block
        import models.sema as sema

        sema_block.device = "cpu"
        quiet_module(sema)
        self.Learner, self.SEMAModules, self.sizes = sema.Learner, sema_block.SEMAModules, sizes

    def args(self) -> dict[str, Any]:
        s = self.sizes
        return {**SEMA_ARGS, "batch_size": s.batch, "init_cls": s.classes, "increment": s.classes,
                "func_epoch": 1, "rd_epoch": 1, "exp_threshold": -1.0}

    def modules(self, learner: Any) -> list[Any]:
        return [m for m in learner._network.backbone.modules() if isinstance(m, self.SEMAModules)]

    def after_first_task(self, first: dict[int, torch.Tensor]) -> Any:
        """A fresh learner after their ``incremental_train`` of task 0 (1 epoch, 1 descriptor epoch on the few
        ``first`` images), set up for the timed task 1: ``sizes.epochs`` / ``sizes.descriptor_epochs`` epochs,
        one expansion in block 9 (threshold -1, so the first block not yet expanded for the task expands;
        blocks 10 and 11 are marked as already expanded, their ``added_for_task`` flag)."""
        with silent():  # construction and the first task print parameter counts and state-dict keys
            learner = self.Learner(self.args())
            learner._compute_accuracy = _eval_mode_only
            learner.incremental_train(DataManager(first, self.sizes.classes, 2))
        learner.after_task()
        learner.args["func_epoch"], learner.args["rd_epoch"] = self.sizes.epochs, self.sizes.descriptor_epochs
        for m in self.modules(learner):
            m.added_for_task = m.layer_id > m.adapt_start_layer
        return learner

    def begin_task(self, learner: Any, data: DataManager) -> None:
        """Their ``incremental_train`` of task 1 up to where ``_train_new`` starts (detection done, the adapter
        added in block 9), then the adapter optimiser as ``_train_new`` makes it."""

        def stop(*args: Any) -> None:
            raise Captured

        learner._train_new = stop
        try:
            learner.incremental_train(data)
        except Captured:
            pass
        finally:
            del learner._train_new
        learner.update_optimizer_and_scheduler(num_epoch=learner.args["func_epoch"], lr=learner.init_lr)

    def train_epoch(self, learner: Any) -> None:
        """One epoch of their training loop (``_init_train``, adapter phase)."""
        learner._init_train(1, learner.train_loader, learner.test_loader, learner.optimizer, learner.scheduler,
                            phase="func")

    def experience(self, learner: Any, data: DataManager) -> dict[str, Any]:
        """Their ``incremental_train`` of task 1 and ``after_task``: seconds in all and per phase."""
        spent = {"func": 0.0, "rd": 0.0}
        init_train = learner._init_train

        def timed(total_epoch: int, *args: Any, phase: str = "func") -> None:
            t = time.perf_counter()
            init_train(total_epoch, *args, phase=phase)
            spent[phase] += time.perf_counter() - t

        learner._init_train = timed
        try:
            t0 = time.perf_counter()
            learner.incremental_train(data)
            learner.after_task()
            total = time.perf_counter() - t0
        finally:
            del learner._init_train
        return {
            "s": total,
            "phases": {"adapter epochs (func)": spent["func"], "descriptor epochs (rd)": spent["rd"],
                       "detection and other": total - spent["func"] - spent["rd"]},
            "adapters_per_layer": {str(m.layer_id): m.num_adapters for m in self.modules(learner)},
        }

    def predict(self, learner: Any, data: DataLoader) -> None:
        learner._eval_cnn(data)


def _eval_mode_only(model: Any, loader: Any) -> float:
    """Stands for SEMA's per-epoch test-set evaluation: it switches the model to eval mode, evaluates nothing."""
    model.eval()
    return 0.0


# ---- MOS ------------------------------------------------------------------------------------------------
class TheirMOS:
    """Their MOS learner with T tasks' adapters. Construct inside ``official_code``."""

    def __init__(self, sizes: Sizes, max_tasks: int, generator: torch.Generator) -> None:
        import models.mos as mos

        quiet_module(mos)
        self.sizes, self.generator = sizes, generator
        args = {**MOS_ARGS, "batch_size": sizes.mos_batch, "init_cls": sizes.classes, "increment": sizes.classes,
                "nb_classes": max_tasks * sizes.classes, "nb_tasks": max_tasks}
        with silent():
            self.learner = mos.Learner(args)

    @torch.no_grad()
    def grow(self, tasks: int) -> None:
        """Add tasks until there are ``tasks``: what their ``incremental_train`` leaves behind, without training —
        classes and their task, the grown cosine head (random prototypes where ``replace_fc`` puts class means),
        the current adapter (random weights) stored by ``adapter_update``."""
        ln, c = self.learner, self.sizes.classes
        net = ln._network
        while ln._cur_task + 1 < tasks:
            ln._cur_task += 1
            ln._total_classes = ln._known_classes + c
            for i in range(ln._known_classes, ln._total_classes):
                ln.cls2task[i] = ln._cur_task
            net.update_fc(ln._total_classes)
            net.fc.weight[ln._known_classes:] = torch.randn(c, net.feature_dim, generator=self.generator)
            for p in net.backbone.cur_adapter.parameters():
                p.copy_(0.02 * torch.randn(p.shape, generator=self.generator))
            net.backbone.adapter_update()
            ln.after_task()

    def tasks(self) -> int:
        return len(self.learner._network.backbone.adapter_list)

    def predict(self, data: DataLoader) -> None:
        self.learner._eval_cnn(data)
