"""Registered paper benchmarks (as SEMA, MOS and the PILOT toolbox run them): class-incremental streams over
CIFAR-100, CUB-200, ImageNet-R, ImageNet-A, ObjectNet, OmniBenchmark and VTAB.

Every entry takes the same parameters:

Args:
    root: the folder of the data (layouts: ``scenarios.sources.paper``).
    n_experiences: how many experiences the classes are split into.
    classes_per_experience: classes per experience, an int increment or a list of sizes (overrides
        ``n_experiences``).
    class_order: the order the classes arrive in (default: PILOT's order drawn from ``seed``).
    seed: PILOT's class-order seed (1993 in the papers; None keeps the class ids' order).
    size: the square side, in pixels, the backbone sees.
    augment: give the training images PILOT's random-resized crop and flip, fresh on every access.
    train_per_class: keep the first N training items of each class (quick runs; None: all).
    test_per_class: keep the first N test items of each class (None: all).

Images go through ``ImageView``: test items, and train items unless ``augment``, are resized (shorter side
``size * 256 / 224``) and centre-cropped, as PILOT evaluates. ``augment=True`` gives the train sets PILOT's
random-resized crop + flip, fresh on every access, flagged ``augmented`` on each ``exp.train`` (and in
``exp.info``), so the engine computes their prefix states fresh every epoch (``cl.cache.is_augmented``) instead
of caching one random view per image.
"""

# No ``from __future__ import annotations``: the registry reads these signatures' annotations as objects.
from collections.abc import Callable

from torch.utils.data import Dataset

from cl.config import Seed
from cl.experience import Stream
from cl.registry import register_scenario
from scenarios.builders import class_incremental, head_per_class
from scenarios.sources.paper import (
    BENCHMARKS,
    cub_layout,
    load_cifar100,
    load_cub200,
    pilot_class_order,
    pilot_folders,
)
from scenarios.sources.views import ImageView
from scenarios.zoo import image_folder

#: the class-order seed of PILOT, SEMA and MOS
PILOT_SEED = 1993


def _views(stream: Stream, name: str, size: int, augment: bool, layout: str) -> Stream:
    """Wrap every experience's data in ``ImageView`` and name the stream after the benchmark."""
    for exp in stream:
        exp.train = ImageView(exp.train, size, augment=augment)
        exp.test = ImageView(exp.test, size)
        exp.info["augmented"] = augment
    stream.name = name
    stream.info.update(benchmark=BENCHMARKS[name].title, layout=layout, size=size, augmented=augment)
    return stream


def _order(name: str, class_order: list[int] | None, seed: int | None) -> list[int]:
    return pilot_class_order(BENCHMARKS[name].n_classes, seed) if class_order is None else class_order


def _split(
    name: str,
    data: tuple[Dataset, Dataset, list[str]],
    per_class: tuple[int | None, int | None],
    n_experiences: int,
    classes_per_experience: int | list[int] | None,
    class_order: list[int] | None,
    seed: int | None,
) -> Stream:
    """Class-incremental split of ``data`` (train, test, class names), capped per class, in PILOT's order."""
    train, test, names = data
    return class_incremental(
        head_per_class(train, per_class[0]), head_per_class(test, per_class[1]),
        n_experiences=None if classes_per_experience is not None else n_experiences,
        classes_per_experience=classes_per_experience, class_order=_order(name, class_order, seed), seed=seed,
        name=name, class_names=names,
    )


@register_scenario("cifar100")
def cifar100(
    root: str = "data",
    n_experiences: int = 10,
    classes_per_experience: int | list[int] | None = None,
    class_order: list[int] | None = None,
    seed: Seed | None = PILOT_SEED,
    size: int = 224,
    augment: bool = False,
    train_per_class: int | None = None,
    test_per_class: int | None = None,
) -> Stream:
    """CIFAR-100 (100 classes, 32 px upscaled) from torchvision's ``cifar-100-python`` folder, no download."""
    data = load_cifar100(root)
    stream = _split("cifar100", data, (train_per_class, test_per_class), n_experiences, classes_per_experience,
                    class_order, seed)
    return _views(stream, "cifar100", size, augment, "cifar-100-python")


@register_scenario("cub200")
def cub200(
    root: str = "data/cub",
    n_experiences: int = 20,
    classes_per_experience: int | list[int] | None = None,
    class_order: list[int] | None = None,
    seed: Seed | None = PILOT_SEED,
    size: int = 224,
    augment: bool = False,
    train_per_class: int | None = None,
    test_per_class: int | None = None,
) -> Stream:
    """CUB-200-2011 birds (200 classes) from PILOT's train/test folders or the original CUB_200_2011 release."""
    data = load_cub200(root)
    stream = _split("cub200", data, (train_per_class, test_per_class), n_experiences, classes_per_experience,
                    class_order, seed)
    return _views(stream, "cub200", size, augment, cub_layout(root) or "")


def _pilot_scenario(name: str, n_experiences: int) -> Callable[..., Stream]:
    """Register ``name``: a PILOT-prepared benchmark read with the ``image_folder`` scenario, in PILOT's order."""
    b = BENCHMARKS[name]
    default_experiences = n_experiences

    def entry(
        root: str = f"data/{b.folder}",
        n_experiences: int = default_experiences,
        classes_per_experience: int | list[int] | None = None,
        class_order: list[int] | None = None,
        seed: Seed | None = PILOT_SEED,
        size: int = 224,
        augment: bool = False,
        train_per_class: int | None = None,
        test_per_class: int | None = None,
    ) -> Stream:
        train, test = pilot_folders(name, root)
        stream = image_folder(  # size=None: original images, ImageView crops them
            str(train), str(test), n_experiences, size=None, classes_per_experience=classes_per_experience,
            class_order=_order(name, class_order, seed), seed=seed, train_per_class=train_per_class,
            test_per_class=test_per_class,
        )
        return _views(stream, name, size, augment, "pilot")

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = (
        f"{b.title} ({b.n_classes} classes) from PILOT's ROOT/train/<class>/* and ROOT/test/<class>/* folders."
    )
    return register_scenario(name)(entry)


imagenet_r = _pilot_scenario("imagenet_r", 10)
imagenet_a = _pilot_scenario("imagenet_a", 10)
objectnet = _pilot_scenario("objectnet", 20)
omnibenchmark = _pilot_scenario("omnibenchmark", 10)
vtab = _pilot_scenario("vtab", 5)
