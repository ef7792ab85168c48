"""Dataset sources: loaders for the data on disk and wrappers around other libraries' datasets."""

from scenarios.sources.avalanche import from_avalanche, to_avalanche
from scenarios.sources.digits import load_digits
from scenarios.sources.fashion_mnist import load_fashion_mnist
from scenarios.sources.fortunes import load_fortunes, read_fortunes
from scenarios.sources.image_folder import ImageFolderDataset, from_torchvision, to_uint8_image

__all__ = [
    "ImageFolderDataset",
    "from_avalanche",
    "from_torchvision",
    "load_digits",
    "load_fashion_mnist",
    "load_fortunes",
    "read_fortunes",
    "to_avalanche",
    "to_uint8_image",
]
