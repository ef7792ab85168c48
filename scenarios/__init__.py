"""Streams of experiences: builders, dataset sources and the registered scenarios.

The data contract they are built from (``Experience``, ``Stream``, ``ArrayDataset``, ``subset``, ``Index``) lives in
``cl`` (``cl.experience``, ``cl.data``) and is re-exported here.

``create_scenario("split_fmnist", n_experiences=5)`` builds a registered scenario by name with
its parameters validated; ``list_scenarios()`` lists the names.
"""

from typing import Any

from cl.data import ArrayDataset, Index, subset
from cl.experience import Experience, Stream
from cl.registry import SCENARIOS
from scenarios import paper, zoo  # noqa: F401  (paper: imported for its registrations)
from scenarios.builders import class_incremental, domain_incremental, head_per_class, task_incremental
from scenarios.sources import (
    ImageFolderDataset,
    from_avalanche,
    from_torchvision,
    load_digits,
    load_fashion_mnist,
    load_fortunes,
    to_avalanche,
)
from scenarios.zoo import (
    image_folder,
    recurring_fmnist,
    rotated_digits,
    split_digits,
    split_fmnist,
    split_fortunes,
    synthetic,
)

assert zoo  # imported for its registrations


def create_scenario(name: str, **params: Any) -> Stream:
    """Build the registered scenario ``name``; unknown or ill-typed ``params`` raise ``ConfigError``."""
    return SCENARIOS.create(name, **params)


def list_scenarios(pattern: str = "*") -> list[str]:
    """Registered scenario names matching a shell-style wildcard, sorted."""
    return SCENARIOS.names(pattern)


__all__ = [
    "ArrayDataset",
    "Experience",
    "ImageFolderDataset",
    "Index",
    "Stream",
    "class_incremental",
    "create_scenario",
    "domain_incremental",
    "from_avalanche",
    "from_torchvision",
    "head_per_class",
    "image_folder",
    "list_scenarios",
    "load_digits",
    "load_fashion_mnist",
    "load_fortunes",
    "recurring_fmnist",
    "rotated_digits",
    "split_digits",
    "split_fmnist",
    "split_fortunes",
    "subset",
    "synthetic",
    "task_incremental",
    "to_avalanche",
]
