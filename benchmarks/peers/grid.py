"""What the peer benchmark runs: streams, methods and their settings, and the data subset."""

from __future__ import annotations

import dataclasses
from typing import Any

# Avalanche methods: (strategy class name in avalanche.training, its extra arguments)
AVALANCHE_METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "naive": ("Naive", {}),
    "lwf": ("LwF", {"alpha": 1.0, "temperature": 2.0}),
    "ewc": ("EWC", {"ewc_lambda": 100.0, "mode": "separate"}),
    "replay": ("Replay", {"mem_size": 2000}),
}
# Avalanche training: SGD over the whole network (trunk + IncrementalClassifier), 1 epoch per experience
AVALANCHE_TRAINING: dict[str, Any] = {"lr": 0.01, "momentum": 0.9, "train_mb_size": 64, "train_epochs": 1}

# Our methods: (registered strategy name, its parameters); the settings behind README's figures
OUR_METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "simplecil": ("simplecil", {}),
    "simplecil_lda": ("simplecil", {"head": "lda"}),
    "sema": ("sema", {}),
    # the defaults of sema before issue 16's one-pass change: routes and head read the frozen embedding
    "sema_frozen": ("sema", {"route_by": "head", "head_features": "concat", "taps": None}),
    "replay": ("replay", {"budget": 2000}),
    "lae": ("lae", {}),
    "aper_lda": ("aper", {"head": "lda"}),
}
TEXT_METHODS = ["simplecil", "simplecil_lda", "sema", "replay"]

STREAMS: dict[str, dict[str, Any]] = {
    "fmnist": {"scenario": "split_fmnist", "backbone": {"name": "efficientnet_lite0", "weights": "imagenet",
                                                         "img_size": 64}},
    "fortunes": {"scenario": "split_fortunes", "backbone": {"name": "minilm", "weights": "pretrained"}},
}
# --weights none (smoke tests): random init, and smaller inputs / a 3-layer MiniLM to keep them fast
RANDOM_WEIGHTS: dict[str, dict[str, Any]] = {
    "efficientnet_lite0": {"weights": "none", "img_size": 32},
    "minilm": {"weights": "none", "max_length": 32,
               "config": {"num_hidden_layers": 3, "hidden_size": 64, "num_attention_heads": 2,
                          "intermediate_size": 128}},
}


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run: a framework's method on a stream for one seed (= class order), fully specified."""

    stream: str
    framework: str  # "avalanche" | "ours"
    method: str
    seed: int
    scenario: dict[str, Any]
    backbone: dict[str, Any]
    threads: int = 1

    @property
    def key(self) -> str:
        return f"{self.stream}-{self.framework}-{self.method}-s{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def build_grid(
    seeds: list[int],
    sizes: dict[str, tuple[int | None, int | None]],
    streams: list[str],
    methods: list[str] | None = None,
    random_weights: bool = False,
    threads: int = 1,
) -> list[RunSpec]:
    """Every run, cheapest first per seed; ``sizes[stream]`` = (train_per_class, test_per_class).

    ``methods`` filters by ``framework:method`` or ``method`` labels.
    """
    specs = []
    for seed in seeds:
        for stream in streams:
            conf = STREAMS[stream]
            backbone = dict(conf["backbone"])
            if random_weights:
                backbone.update(RANDOM_WEIGHTS[backbone["name"]])
            train_pc, test_pc = sizes[stream]
            scenario = {"name": conf["scenario"], "n_experiences": 5, "seed": seed}
            scenario.update({k: v for k, v in (("train_per_class", train_pc), ("test_per_class", test_pc)) if v})
            runs = [("ours", m) for m in (OUR_METHODS if stream == "fmnist" else TEXT_METHODS)]
            runs += [("avalanche", m) for m in AVALANCHE_METHODS]
            for framework, method in runs:
                if methods and f"{framework}:{method}" not in methods and method not in methods:
                    continue
                specs.append(RunSpec(stream, framework, method, seed, scenario, backbone, threads))
    return specs
