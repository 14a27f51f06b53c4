"""Models: the torchvision backbone factory and the ``DogBreedClassifier`` LightningModule."""

from dogbreed.models.backbone import WeightsError, create_backbone, find_head, load_backbone_weights
from dogbreed.models.classifier import DogBreedClassifier

__all__ = ["DogBreedClassifier", "WeightsError", "create_backbone", "find_head", "load_backbone_weights"]
