"""Data: staging (local | s3:// | https:// -> cache + manifest), layout checks and the datamodule."""

from dogbreed.data.datamodule import DogBreedDataModule
from dogbreed.data.layout import DataError, DatasetIndex, build_index
from dogbreed.data.staging import stage, upload

__all__ = ["DataError", "DatasetIndex", "DogBreedDataModule", "build_index", "stage", "upload"]
