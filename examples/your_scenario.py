"""A scenario of your own data, registered by name so that `cl run`, configs and sweeps can use it
(docs/your-data.md, "From the command line"). Run it with

    cl run --import examples/your_scenario.py --scenario my_digits --set backbone.img_size=32
"""

# No `from __future__ import annotations`: the registry reads the signature's annotations to validate parameters.
from cl.experience import Stream
from cl.registry import register_scenario
from scenarios import ArrayDataset, class_incremental


@register_scenario("my_digits")
def my_digits(n_experiences: int = 5, seed: int = 0) -> Stream:
    """scikit-learn's digits, read as your own arrays would be: float images of 0-16, labels 0-9.

    Args:
        n_experiences: how many experiences the 10 classes are split into.
        seed: the seed of the class order.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images[:, None]  # [N, 8, 8] -> [N, 1, 8, 8]
    train = ArrayDataset(images[::2], digits.target[::2], value_range=(0, 16))
    test = ArrayDataset(images[1::2], digits.target[1::2], value_range=(0, 16))
    return class_incremental(train, test, n_experiences=n_experiences, seed=seed, name="my_digits")
