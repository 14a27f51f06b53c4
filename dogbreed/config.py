"""What the extras share, with no Lightning, Optuna or SageMaker import: the config dir and its resolvers,
composing a config, and the hyperparameter search space that the local and the SageMaker tuner both read.

The configs are the repo's top-level ``conf/``; the build installs them as the ``dogbreed.conf`` package
data, so a wheel carries them and ``CONFIG_DIR`` finds them in a source checkout and an install alike.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

__all__ = ["CONFIG_DIR", "TuneConfigError", "amp_precision", "compose_config", "on_cuda", "search_space"]


def _config_dir() -> Path:
    spec = importlib.util.find_spec("dogbreed.conf")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "dogbreed's configs (dogbreed.conf) are not installed; reinstall dogbreed (`pip install -e .` in a "
            "checkout, or `pip install dogbreed-*.whl`)."
        )
    return Path(next(iter(spec.submodule_search_locations)))


CONFIG_DIR = _config_dir()


def on_cuda(accelerator: str) -> bool:
    """Whether ``trainer.accelerator`` trains on a CUDA GPU (``auto`` does when one is present)."""
    import torch

    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def amp_precision(accelerator: str = "gpu") -> str:
    """``bf16-mixed`` on GPUs that support bf16, else ``16-mixed``; ``32-true`` on a CPU, where AMP only slows."""
    import torch

    if not on_cuda(accelerator):
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "16-mixed"


def register_resolvers() -> None:
    """Resolvers: ``${dogbreed.demo_data:}``, ``${dogbreed.amp_precision:ACCEL}``, ``${dogbreed.on_cuda:ACCEL}``."""
    OmegaConf.register_new_resolver("dogbreed.demo_data", lambda: str(files("dogbreed") / "demo_data"), replace=True)
    OmegaConf.register_new_resolver("dogbreed.amp_precision", amp_precision, replace=True)
    OmegaConf.register_new_resolver("dogbreed.on_cuda", on_cuda, replace=True)


register_resolvers()


def compose_config(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """Compose ``conf/<name>.yaml`` with ``overrides`` as the command line would, without Hydra's runtime."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        return compose(name, overrides=list(overrides))


class TuneConfigError(ValueError):
    """``hparams_search`` or ``tune`` is malformed; the message names the setting and the fix."""


def search_space(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """``cfg.hparams_search.params`` as plain dicts, checked once for both tuners."""
    params = OmegaConf.to_container(cfg.hparams_search.params, resolve=True)
    if not params:
        raise TuneConfigError("hparams_search.params is empty; add e.g. model.lr: {type: float, low: ..., high: ...}.")
    for name, spec in params.items():
        kind = spec.get("type")
        if kind in ("float", "int"):
            if not isinstance(spec.get("low"), int | float) or not isinstance(spec.get("high"), int | float):
                raise TuneConfigError(
                    f"hparams_search.params.{name}: low and high must be numbers (got {spec.get('low')!r}, "
                    f"{spec.get('high')!r}); write floats with a dot, e.g. 1.0e-5, since YAML reads 1e-5 as text."
                )
            if spec["low"] >= spec["high"] or (spec.get("log") and spec["low"] <= 0):
                raise TuneConfigError(f"hparams_search.params.{name}: need 0 < low < high for log scale, low < high.")
        elif kind == "categorical":
            if not spec.get("choices"):
                raise TuneConfigError(f"hparams_search.params.{name}: categorical needs a non-empty choices list.")
        else:
            raise TuneConfigError(f"hparams_search.params.{name}: type={kind!r}; use float, int or categorical.")
    return params
