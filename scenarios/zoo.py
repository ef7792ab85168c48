"""Registered scenarios: each a thin function over a source and a builder, created by name.

The parameters they share (``cl list scenarios NAME`` shows an entry's):

Args:
    n_experiences: how many experiences the classes are split into (it must divide the class count).
    classes_per_experience: classes per experience as a list (an uneven split; it overrides ``n_experiences``).
    class_order: the order the classes arrive in (default: a permutation drawn from ``seed``).
    seed: the seed of the class order (default: the run's seed; None keeps the class ids' order).
    train_per_class: keep the first N training items of each class (quick runs; None: all).
    test_per_class: keep the first N test items of each class (None: all).
    kind: ``class``-incremental, or ``task``-incremental (the task label is known at test time).
    root: the folder the data is read from (default: ``$CLAGENT_FMNIST_ROOT``, else the Debian path).
    test_fraction: share of each class held out as test data.
    size: the side, in pixels, images are resized to.
"""

# No ``from __future__ import annotations`` here: the registry reads these signatures' annotations
# as objects to validate parameters, and string annotations would not resolve there.
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from cl.config import Seed
from cl.data import ArrayDataset
from cl.errors import ConfigError
from cl.experience import Stream
from cl.registry import register_scenario
from scenarios.builders import class_incremental, domain_incremental, head_per_class, task_incremental
from scenarios.sources.digits import load_digits
from scenarios.sources.fashion_mnist import load_fashion_mnist
from scenarios.sources.fortunes import DEBIAN_ROOT as FORTUNES_ROOT
from scenarios.sources.fortunes import load_fortunes, read_fortunes, select_categories
from scenarios.sources.image_folder import ImageFolderDataset

Kind = Literal["class", "task"]


def _split(
    name: str,
    data: tuple[Dataset, Dataset, Sequence[str]],
    kind: Kind,
    per_class: tuple[int | None, int | None],
    **split: Any,
) -> Stream:
    """``data`` = (train, test, class names) capped per class, then split by the builder for ``kind``.

    ``classes_per_experience``, when given, overrides ``n_experiences``.
    """
    train, test, class_names = data
    if split.get("classes_per_experience") is not None:
        split["n_experiences"] = None
    build = task_incremental if kind == "task" else class_incremental
    return build(
        head_per_class(train, per_class[0]),
        head_per_class(test, per_class[1]),
        name=name,
        class_names=class_names,
        **split,
    )


@register_scenario("split_fmnist")
def split_fmnist(
    n_experiences: int = 5,
    classes_per_experience: list[int] | None = None,
    class_order: list[int] | None = None,
    seed: Seed | None = 0,
    root: str | None = None,
    train_per_class: int | None = None,
    test_per_class: int | None = None,
    kind: Kind = "class",
) -> Stream:
    """FashionMNIST (28x28 grey clothes, 10 classes) split into class groups.

    ``classes_per_experience`` (a list of sizes) gives an uneven split instead of ``n_experiences``;
    ``train_per_class`` / ``test_per_class`` keep the first N items of each class (quick runs).
    """
    return _split(
        "split_fmnist",
        load_fashion_mnist(root),
        kind,
        (train_per_class, test_per_class),
        n_experiences=n_experiences,
        classes_per_experience=classes_per_experience,
        class_order=class_order,
        seed=seed,
    )


@register_scenario("split_digits")
def split_digits(
    n_experiences: int = 5,
    classes_per_experience: list[int] | None = None,
    class_order: list[int] | None = None,
    seed: Seed | None = 0,
    test_fraction: float = 0.25,
    train_per_class: int | None = None,
    test_per_class: int | None = None,
    kind: Kind = "class",
) -> Stream:
    """scikit-learn digits (8x8, 10 classes, 1797 images) split into class groups; tiny and offline."""
    return _split(
        "split_digits",
        load_digits(test_fraction, seed or 0),
        kind,
        (train_per_class, test_per_class),
        n_experiences=n_experiences,
        classes_per_experience=classes_per_experience,
        class_order=class_order,
        seed=seed,
    )


@register_scenario("split_fortunes")
def split_fortunes(
    n_experiences: int = 5,
    min_entries: int = 150,
    max_categories: int | None = None,
    seed: Seed | None = 0,
    classes_per_experience: list[int] | None = None,
    class_order: list[int] | None = None,
    root: str = FORTUNES_ROOT,
    test_fraction: float = 0.2,
    train_per_class: int | None = None,
    test_per_class: int | None = None,
    kind: Kind = "class",
) -> Stream:
    """Text: fortune-cookie categories (Debian ``fortunes``) with >= ``min_entries`` entries, split in groups.

    Args:
        min_entries: a category needs at least this many entries to be a class.
        max_categories: keep this many of the largest categories (default: as many as split evenly).


    Keeps the ``max_categories`` largest categories; by default as many as ``classes_per_experience``
    sums to, else the largest multiple of ``n_experiences`` available, so the split is even.
    """
    counts = {c: len(e) for c, e in read_fortunes(root).items()}
    eligible = select_categories(counts, min_entries)
    if max_categories is None and classes_per_experience is not None:
        max_categories = sum(classes_per_experience)
    elif max_categories is None:
        max_categories = len(eligible) - len(eligible) % max(n_experiences, 1)
    if max_categories < 1:
        raise ConfigError(
            f"only {len(eligible)} fortune categories have >= {min_entries} entries: "
            f"too few for n_experiences={n_experiences}; lower min_entries"
        )
    chosen = sorted(eligible, key=lambda c: (-counts[c], c))[:max_categories]
    data = load_fortunes(root, min_entries, test_fraction, seed or 0, categories=chosen)
    return _split(
        "split_fortunes",
        data,
        kind,
        (train_per_class, test_per_class),
        n_experiences=n_experiences,
        classes_per_experience=classes_per_experience,
        class_order=class_order,
        seed=seed,
    )


@register_scenario("image_folder")
def image_folder(
    train_root: str,
    test_root: str,
    n_experiences: int,
    size: int = 224,
    classes_per_experience: list[int] | None = None,
    class_order: list[int] | None = None,
    seed: Seed | None = 0,
    train_per_class: int | None = None,
    test_per_class: int | None = None,
    kind: Kind = "class",
) -> Stream:
    """Your images: ``train_root/<class>/*`` and ``test_root/<class>/*``, resized to ``size`` squares.

    Args:
        train_root: the training images, one subfolder per class.
        test_root: the test images, in subfolders named as the training ones (some may be missing).
    """
    train = ImageFolderDataset(train_root, size)
    test = ImageFolderDataset(test_root, size, classes=train.classes)
    return _split(
        "image_folder",
        (train, test, train.classes),
        kind,
        (train_per_class, test_per_class),
        n_experiences=n_experiences,
        classes_per_experience=classes_per_experience,
        class_order=class_order,
        seed=seed,
    )


def synthetic_images(
    n_classes: int, per_class: int, image_size: int, channels: int, seed: int, noise_seed: int
) -> ArrayDataset:
    """Noisy copies of one random blocky pattern per class (fixed by ``seed``), uint8 ``[C, S, S]``."""
    grid = 4
    rng = np.random.default_rng(seed)
    patterns: dict[bytes, np.ndarray] = {}
    while len(patterns) < n_classes:  # distinct patterns, distinct per-channel brightness
        p = rng.integers(0, 2, size=(channels, grid, grid), dtype=np.uint8)
        patterns.setdefault(p.sum(axis=(1, 2)).tobytes() + p.tobytes(), p)
    protos = np.stack(list(patterns.values())).astype(np.float32)
    cell = -(-image_size // grid)
    protos = protos.repeat(cell, axis=2).repeat(cell, axis=3)[:, :, :image_size, :image_size]
    shape = (n_classes, per_class, channels, image_size, image_size)
    noise = np.random.default_rng(noise_seed).normal(0, 20, size=shape)
    images = np.clip(50 + 150 * protos[:, None] + noise, 0, 255).astype(np.uint8)
    targets = np.repeat(np.arange(n_classes), per_class)
    return ArrayDataset(images.reshape(-1, channels, image_size, image_size), targets)


@register_scenario("synthetic")
def synthetic(
    n_classes: int = 6,
    n_experiences: int = 3,
    train_per_class: int = 32,
    test_per_class: int = 16,
    image_size: int = 16,
    channels: int = 3,
    seed: Seed = 0,
    kind: Kind = "class",
) -> Stream:
    """Random uint8 images whose class sets a clear blocky pattern: tiny models learn it; for fast tests.

    Args:
        n_classes: how many classes (one pattern each).
        train_per_class: training images per class.
        test_per_class: test images per class.
        image_size: the images' side in pixels.
        channels: channels per image.
    """
    if min(n_classes, train_per_class, test_per_class, image_size, channels) < 1:
        raise ConfigError("synthetic: sizes and counts must all be >= 1")
    train = synthetic_images(n_classes, train_per_class, image_size, channels, seed, noise_seed=seed + 1)
    test = synthetic_images(n_classes, test_per_class, image_size, channels, seed, noise_seed=seed + 2)
    data = (train, test, [f"class_{c}" for c in range(n_classes)])
    return _split("synthetic", data, kind, (None, None), n_experiences=n_experiences, seed=seed)


def rotate_images(images: torch.Tensor, angle: float) -> torch.Tensor:
    """Images ``[N, C, H, W]`` rotated counter-clockwise by ``angle`` degrees (exact for multiples of 90)."""
    if angle % 90 == 0:
        return torch.rot90(images, k=int(angle // 90) % 4, dims=(-2, -1)).contiguous()
    from torchvision.transforms.functional import rotate

    return rotate(images, float(angle))


@register_scenario("rotated_digits")
def rotated_digits(
    angles: Sequence[float] = (0.0, 90.0),
    seed: Seed = 0,
    test_fraction: float = 0.25,
    train_per_class: int | None = None,
    test_per_class: int | None = None,
) -> Stream:
    """Domain-incremental digits: one experience per angle, the same images rotated.

    Args:
        angles: one experience per angle, in degrees counter-clockwise.

    A repeated angle (``angles=[0, 0, 90]``) repeats the same experience, domain name included.
    """
    if not angles:
        raise ConfigError("rotated_digits: give at least one angle")
    train, test, names = load_digits(test_fraction, seed)
    train, test = head_per_class(train, train_per_class), head_per_class(test, test_per_class)
    domains = []
    for angle in angles:
        pair = [ArrayDataset(rotate_images(d.inputs, angle), d.targets) for d in (train, test)]  # type: ignore[union-attr]
        domains.append((f"rot{angle:g}", pair[0], pair[1]))
    return domain_incremental(domains, name="rotated_digits", class_names=names)


#: the domains of ``recurring_fmnist``: uint8 images ``[N, 1, H, W]`` -> the same images in that domain
FMNIST_DOMAINS = {
    "original": lambda x: x,
    "inverted": lambda x: 255 - x,
    "rot90": lambda x: torch.rot90(x, 1, dims=(-2, -1)).contiguous(),
    "rot180": lambda x: torch.rot90(x, 2, dims=(-2, -1)).contiguous(),
    "low_contrast": lambda x: x // 2 + 64,
}


def perturb(images: torch.Tensor, angle: float, contrast: float) -> torch.Tensor:
    """uint8 images rotated by ``angle`` degrees (black fill) and their intensities scaled by ``contrast``."""
    from torchvision.transforms.functional import rotate

    out = rotate(images, float(angle)) if angle else images
    return (out.float() * contrast).round().clamp(0, 255).to(torch.uint8)


@register_scenario("recurring_fmnist")
def recurring_fmnist(
    domains: Sequence[str] = ("original", "inverted", "rot90"),
    repeats: int = 3,
    jitter: float = 10.0,
    contrast_jitter: float = 0.15,
    seed: Seed = 0,
    root: str | None = None,
    train_per_class: int = 300,
    test_per_class: int = 100,
) -> Stream:
    """Domain-incremental FashionMNIST whose domains (original, inverted, rotated...) recur with small shifts.

    ``domains`` in turn, ``repeats`` times, all 10 classes in every experience. Each recurrence is its domain with a
    small shift (a rotation and a contrast change drawn from ``seed``), on fresh images: experience k holds the k-th
    slice of ``train_per_class`` / ``test_per_class`` items of each class, so no image is seen twice. A stream where
    self-expansion should reuse adapters.

    Args:
        domains: the domains in the order they first appear (``original``, ``inverted``, ``rot90``, ``rot180``,
            ``low_contrast``); an experience's ``domain`` is its name, the same at every recurrence.
        repeats: how many times the list of domains is run through (experiences: ``len(domains) * repeats``).
        jitter: a recurrence is rotated by an angle drawn uniformly in [-jitter, jitter] degrees.
        contrast_jitter: a recurrence's intensities are scaled by a factor drawn in [1 - it, 1 + it].
        seed: the seed of the recurrences' shifts.
        train_per_class: training items of each class per experience (a fresh slice each time).
        test_per_class: test items of each class per experience (a fresh slice each time).

    The first round is the domains unshifted; ``stream.info["shifts"]`` lists each experience's
    ``(domain, round, angle, contrast)``.
    """
    unknown = [d for d in domains if d not in FMNIST_DOMAINS]
    if unknown or not domains:
        raise ConfigError(f"recurring_fmnist: unknown domains {unknown} (choose from {', '.join(FMNIST_DOMAINS)})")
    if repeats < 1 or min(train_per_class, test_per_class) < 1:
        raise ConfigError("recurring_fmnist: repeats, train_per_class and test_per_class must be >= 1")
    if not (0 <= contrast_jitter < 1) or jitter < 0:
        raise ConfigError("recurring_fmnist: jitter must be >= 0 and contrast_jitter in [0, 1)")
    train, test, names = load_fashion_mnist(root)
    n_exp = len(domains) * repeats
    for split, data, n in (("train", train, train_per_class), ("test", test, test_per_class)):
        have = int(torch.bincount(data.targets).min())
        if n * n_exp > have:
            raise ConfigError(f"recurring_fmnist: {n_exp} experiences x {split}_per_class={n} need {n * n_exp} "
                              f"{split} items per class, FashionMNIST has {have}: lower {split}_per_class or repeats")
    rng = np.random.default_rng(seed)
    experiences, shifts = [], []
    for k in range(n_exp):
        domain, round_ = domains[k % len(domains)], k // len(domains)
        angle, contrast = 0.0, 1.0
        if round_:
            angle = float(rng.uniform(-jitter, jitter))
            contrast = float(rng.uniform(1 - contrast_jitter, 1 + contrast_jitter))
        pair = []
        for data, n in ((train, train_per_class), (test, test_per_class)):
            part = head_per_class(data, n, start=k * n)
            pair.append(ArrayDataset(FMNIST_DOMAINS[domain](perturb(part.inputs, angle, contrast)), part.targets))
        experiences.append((domain, pair[0], pair[1]))
        shifts.append({"domain": domain, "round": round_, "angle": round(angle, 3), "contrast": round(contrast, 4)})
    return domain_incremental(experiences, name="recurring_fmnist", class_names=names,
                              info={"shifts": shifts, "seed": seed})
