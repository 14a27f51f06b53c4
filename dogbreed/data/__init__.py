"""Data: staging (local | s3:// | https:// -> cache + manifest), layout checks and the datamodule.

The names below are loaded on first use, so that ``dogbreed.data.layout`` (which files are images, what a
class folder is) can be imported by batch prediction without the datamodule's Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dogbreed.data.datamodule import DogBreedDataModule
    from dogbreed.data.layout import DataError, DatasetIndex, build_index
    from dogbreed.data.staging import stage, upload

__all__ = ["DataError", "DatasetIndex", "DogBreedDataModule", "build_index", "stage", "upload"]

_HOMES = {
    "DogBreedDataModule": "datamodule",
    "DataError": "layout",
    "DatasetIndex": "layout",
    "build_index": "layout",
    "stage": "staging",
    "upload": "staging",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
