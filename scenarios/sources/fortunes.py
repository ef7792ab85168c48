"""Text classification from the ``fortune`` cookie files: one class per category file."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cl.data import ArrayDataset
from cl.errors import ConfigError, DataError

DEBIAN_ROOT = "/usr/share/games/fortunes"
INSTALL_HINT = (
    "install the Debian package fortunes (apt-get install fortunes; fortunes-min ships only a few "
    "categories) or pass root= a folder of fortune files"
)


def parse_fortunes(text: str) -> list[str]:
    """The entries of one fortune file (separated by lines holding only ``%``), stripped, non-empty."""
    entries, current = [], []
    for line in text.splitlines():
        if line.strip() == "%":
            entries.append("\n".join(current))
            current = []
        else:
            current.append(line)
    entries.append("\n".join(current))
    return [e.strip() for e in entries if e.strip()]


@functools.cache
def read_fortunes(root: str = DEBIAN_ROOT) -> dict[str, list[str]]:
    """Category name -> distinct entries, for every fortune file directly under ``root``.

    Index files (``.dat``), ``.u8`` links and subfolders (such as the offensive ``off/``) are skipped.
    """
    base = Path(root)
    if not base.is_dir():
        raise DataError(f"fortune folder {root} not found: {INSTALL_HINT}")
    categories = {}
    for path in sorted(base.iterdir()):
        if path.suffix in (".dat", ".u8") or path.name.startswith(".") or not path.is_file():
            continue
        entries = parse_fortunes(path.read_text(encoding="utf-8", errors="replace"))
        if entries:
            categories[path.name] = list(dict.fromkeys(entries))
    if not categories:
        raise DataError(f"no fortune files under {root}: {INSTALL_HINT}")
    return categories


def select_categories(
    counts: dict[str, int], min_entries: int = 150, categories: Sequence[str] | None = None
) -> list[str]:
    """Sorted category names: ``categories`` (checked), else those with >= ``min_entries`` entries."""
    if categories is not None:
        unknown = sorted(set(categories) - set(counts))
        if unknown:
            available = ", ".join(sorted(counts))
            raise ConfigError(f"unknown fortune categories {unknown} (available: {available})")
        return sorted(dict.fromkeys(categories))
    chosen = sorted(c for c, n in counts.items() if n >= min_entries)
    if len(chosen) < 2:
        raise DataError(
            f"only {len(chosen)} fortune categories have >= {min_entries} entries "
            f"(counts: {dict(sorted(counts.items()))}): lower min_entries or {INSTALL_HINT}"
        )
    return chosen


def load_fortunes(
    root: str = DEBIAN_ROOT,
    min_entries: int = 150,
    test_fraction: float = 0.2,
    seed: int = 0,
    categories: Sequence[str] | None = None,
) -> tuple[ArrayDataset, ArrayDataset, list[str]]:
    """``(train, test, class_names)`` of fortune strings, split per category (stratified) by ``seed``.

    Classes are the chosen category names, sorted: ``categories`` when given, else every category
    with at least ``min_entries`` distinct entries.
    """
    if not 0 < test_fraction < 1:
        raise ConfigError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    texts = read_fortunes(str(root))
    names = select_categories({c: len(e) for c, e in texts.items()}, min_entries, categories)
    rng = np.random.default_rng(seed)
    splits: dict[str, tuple[list[str], list[int]]] = {"train": ([], []), "test": ([], [])}
    for label, name in enumerate(names):
        entries = texts[name]
        perm = rng.permutation(len(entries))
        n_test = max(1, round(len(entries) * test_fraction))
        if n_test >= len(entries):
            raise DataError(f"fortune category {name!r} has {len(entries)} entries: too few to split")
        for split, idx in (("test", np.sort(perm[:n_test])), ("train", np.sort(perm[n_test:]))):
            splits[split][0].extend(entries[i] for i in idx)
            splits[split][1].extend([label] * len(idx))
    return ArrayDataset(*splits["train"]), ArrayDataset(*splits["test"]), names
