"""dogbreed: fine-tune an ImageNet ResNet-18 for dog-breed classification with Lightning and Hydra.

Use the pieces without Hydra::

    from dogbreed import DogBreedDataModule, DogBreedClassifier
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dogbreed.data import DogBreedDataModule
    from dogbreed.models import DogBreedClassifier
    from dogbreed.transforms import Preprocessing

__all__ = ["DogBreedClassifier", "DogBreedDataModule", "Preprocessing"]
__version__ = "0.1.0"

# Imported on first use: ``dogbreed.transforms`` and ``dogbreed.serve`` must not pull in Lightning
# (an endpoint has to start fast with few dependencies).
_LAZY = {
    "DogBreedDataModule": "dogbreed.data",
    "DogBreedClassifier": "dogbreed.models",
    "Preprocessing": "dogbreed.transforms",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dogbreed' has no attribute {name!r}")
