"""Models: the torchvision backbone factory and the ``DogBreedClassifier`` LightningModule."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dogbreed.models.backbone import WeightsError, create_backbone, find_head, load_backbone_weights

if TYPE_CHECKING:
    from dogbreed.models.classifier import DogBreedClassifier

__all__ = ["DogBreedClassifier", "WeightsError", "create_backbone", "find_head", "load_backbone_weights"]


def __getattr__(name: str) -> Any:
    # The LightningModule is imported on first use so that serving can import the backbone without Lightning.
    if name == "DogBreedClassifier":
        from dogbreed.models.classifier import DogBreedClassifier

        return DogBreedClassifier
    raise AttributeError(f"module 'dogbreed.models' has no attribute {name!r}")
