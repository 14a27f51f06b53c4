"""dogbreed: fine-tune an ImageNet ResNet-18 for dog-breed classification with Lightning and Hydra.

Use the pieces without Hydra::

    from dogbreed import DogBreedDataModule, DogBreedClassifier
"""

from dogbreed.data import DogBreedDataModule
from dogbreed.models import DogBreedClassifier
from dogbreed.transforms import Preprocessing

__all__ = ["DogBreedClassifier", "DogBreedDataModule", "Preprocessing"]
__version__ = "0.1.0"
