"""Backbone factory: any ``torchvision.models`` classifier with its head replaced for ``num_classes``.

Weights resolution (``model.weights``):
- ``None``: random initialisation;
- a torchvision weights name (``IMAGENET1K_V1``, ``DEFAULT``): torchvision's normal cache and download;
- a local path or ``s3://`` URI to a state dict: for air-gapped and network-isolated jobs.

Stem (``model.stem``): ``imagenet`` keeps the backbone's own first layers; ``small`` replaces a ResNet's 7x7
stride-2 first convolution by a 3x3 stride-1 one for inputs of 28-64 px, where the original stem (stride 4 with
its max-pool) would leave layer4 a 1x1 map. The max-pool stays, so layer1 runs at half the input size: four
times cheaper than the CIFAR-style ResNet without it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

log = logging.getLogger(__name__)


class WeightsError(RuntimeError):
    """Pretrained weights could not be fetched or do not fit the backbone."""


class BackboneError(ValueError):
    """``model.backbone``, ``model.stem`` or ``model.backbone_kwargs`` do not describe a network to build."""


def find_head(model: nn.Module) -> str:
    """Name of the final ``nn.Linear`` (the classification head) of a torchvision classifier."""
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise BackboneError(
            f"{type(model).__name__} has no nn.Linear head to replace; pick a backbone with a linear classifier."
        )
    return linears[-1]


def _replace_head(model: nn.Module, num_classes: int) -> str:
    name = find_head(model)
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old: nn.Linear = getattr(parent, attr)
    new = nn.Linear(old.in_features, num_classes)
    nn.init.normal_(new.weight, std=0.01)  # small logits at start: a calm first step for the new head
    nn.init.zeros_(new.bias)
    setattr(parent, attr, new)
    return name


STEMS = ("imagenet", "small")


def _small_stem(model: nn.Module, name: str) -> str:
    """Swap a ResNet's 7x7 stride-2 ``conv1`` for a 3x3 stride-1 one; return the replaced layer's name."""
    conv = getattr(model, "conv1", None)
    if not isinstance(conv, nn.Conv2d) or not isinstance(getattr(model, "maxpool", None), nn.MaxPool2d):
        raise BackboneError(
            f"model.stem=small needs a ResNet-style backbone (conv1 + maxpool); {name} has none. "
            "Use model.stem=imagenet."
        )
    model.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return "conv1"


def flip_averaged(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Mean logits of ``x`` (N, C, H, W) and its mirror image: test-time flip, the same in training and serving."""
    return (forward(x) + forward(x.flip(-1))) / 2


_PLAIN = (str, int, float, bool, type(None))


def build_backbone_kwargs(spec: Mapping[str, Any] | None, where: str = "model.backbone_kwargs") -> dict[str, Any]:
    """The torchvision constructor arguments that ``spec``, as recorded in ``model_config.json``, describes.

    Values are plain (numbers, strings, lists) or a ``torch.nn`` class in Hydra's form (``_target_``, and
    ``_partial_: true`` with its arguments), such as a BatchNorm with another ``eps``: serving rebuilds the
    trained network from this record, and builds nothing outside ``torch.nn`` from a model package, whose
    weights load without unpickling code for the same reason.
    """
    return {key: _build_value(value, f"{where}.{key}") for key, value in (spec or {}).items()}


def backbone_kwargs_spec(kwargs: Mapping[str, Any] | None, where: str = "model.backbone_kwargs") -> dict[str, Any]:
    """The recorded form of constructor arguments, built (what Hydra hands the model) or recorded already.

    The inverse of :func:`build_backbone_kwargs`: a ``functools.partial`` of a ``torch.nn`` class (or the class)
    becomes ``{"_target_": ..., "_partial_": True, **its keywords}``, so checkpoints and ``model_config.json``
    hold plain values from which the same network is rebuilt.
    """
    spec = {key: _spec_value(value, f"{where}.{key}") for key, value in (kwargs or {}).items()}
    build_backbone_kwargs(spec, where)
    return spec


def _not_recordable(value: Any, where: str) -> BackboneError:
    return BackboneError(
        f"{where} is a {type(value).__name__}; the exported model records its backbone's arguments, so they "
        "must be plain values or a torch.nn class given by _target_ (and _partial_: true)."
    )


def _spec_value(value: Any, where: str) -> Any:
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, list | tuple):
        return [_spec_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        return {k: _spec_value(v, f"{where}.{k}") for k, v in value.items()}
    func, keywords = (value.func, value.keywords) if isinstance(value, functools.partial) else (value, {})
    if isinstance(value, functools.partial) and value.args:
        raise BackboneError(f"{where} is a partial with positional arguments; give them by keyword.")
    if not isinstance(func, type):
        raise _not_recordable(value, where)
    target = f"{func.__module__}.{func.__qualname__}"
    return {"_target_": target, "_partial_": True, **{k: _spec_value(v, f"{where}.{k}") for k, v in keywords.items()}}


def _build_value(value: Any, where: str) -> Any:
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, list | tuple):
        return [_build_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, Mapping):
        raise _not_recordable(value, where)
    if "_target_" not in value:
        return build_backbone_kwargs(value, where)
    target = str(value["_target_"])
    module, _, attr = target.rpartition(".")
    cls = None
    if module.split(".")[:2] == ["torch", "nn"]:
        with contextlib.suppress(ImportError):
            cls = getattr(importlib.import_module(module), attr, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise BackboneError(
            f"{where}._target_={target!r} is not a torch.nn module class (torch.nn.BatchNorm2d, ...): serving "
            "builds only those when it rebuilds the network from model_config.json."
        )
    args = {k: _build_value(v, f"{where}.{k}") for k, v in value.items() if k not in ("_target_", "_partial_")}
    return functools.partial(cls, **args) if value.get("_partial_", False) else cls(**args)


def _is_weights_file(weights: str) -> bool:
    return weights.startswith("s3://") or "/" in weights or weights.endswith((".pth", ".pt", ".bin", ".ckpt"))


def create_backbone(
    name: str,
    num_classes: int,
    weights: str | None = None,
    *,
    cache_dir: str | Path | None = None,
    stem: str = "imagenet",
    **kwargs: Any,
) -> tuple[nn.Module, str]:
    """Build ``torchvision.models.<name>`` with a fresh ``num_classes`` head; return it and the head's name.

    Args:
        name: A torchvision classification model (``resnet18``, ``mobilenet_v2``, ``efficientnet_b0``, ...).
        num_classes: Output classes of the new head.
        weights: ``None``, a torchvision weights enum name, or a state-dict file path / ``s3://`` URI.
        cache_dir: Where ``s3://`` weight files are cached.
        stem: ``imagenet`` (the backbone's own) or ``small`` (3x3 stride-1 first convolution, for small inputs;
            pretrained weights then load for every layer but that one).
        **kwargs: Passed to the torchvision constructor (e.g. ``norm_layer``).
    """
    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise BackboneError(
            f"model.backbone={name!r} is not a torchvision classification model; choose from {available}."
        )
    if stem not in STEMS:
        raise BackboneError(f"model.stem={stem!r} is not a stem; choose from {list(STEMS)}.")
    if weights is None or _is_weights_file(str(weights)):
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    else:
        model = _torchvision_pretrained(name, str(weights), **kwargs)
    head = _replace_head(model, num_classes)
    fresh = (_small_stem(model, name),) if stem == "small" else ()
    if weights is not None and _is_weights_file(str(weights)):
        load_backbone_weights(model, weights, head=head, cache_dir=cache_dir, fresh=fresh)
    return model, head


def _torchvision_pretrained(name: str, weights: str, **kwargs: Any) -> nn.Module:
    try:
        enum = torchvision.models.get_model_weights(name)
        resolved = enum[weights] if weights != "DEFAULT" else enum.DEFAULT
    except KeyError:
        options = [w.name for w in torchvision.models.get_model_weights(name)]
        raise WeightsError(
            f"model.weights={weights!r} is not a weights name of {name}; choose from {options}, a file path, or null."
        ) from None
    try:
        return torchvision.models.get_model(name, weights=resolved, **kwargs)
    except (OSError, RuntimeError) as err:  # URLError is an OSError; a torn download raises RuntimeError
        raise WeightsError(
            f"could not fetch {name} weights {weights} from {resolved.url} ({err}). Without network access, download "
            f"that file elsewhere and set model.weights=/path/to/{Path(resolved.url).name} (or an s3:// URI), "
            "or model.weights=null to train from random initialisation."
        ) from err


def _read_state_dict(weights: str, cache_dir: str | Path | None) -> tuple[dict[str, torch.Tensor], str]:
    if weights.startswith("s3://"):
        from dogbreed._io import download_s3_file

        path = download_s3_file(weights, cache_dir)
    else:
        path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsError(f"model.weights file {path} does not exist.")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} is not a state dict (a mapping of parameter names to tensors).")
    return state, str(path)


def load_backbone_weights(
    model: nn.Module,
    weights: str | Path,
    *,
    head: str,
    cache_dir: str | Path | None = None,
    fresh: tuple[str, ...] = (),
) -> None:
    """Load a state-dict file into ``model``; only the head (and ``fresh`` layers) may be missing, shapes must match.

    A head in the file that does not fit ``num_classes`` (an ImageNet ``fc`` for 133 breeds) is skipped, and so
    are the file's tensors for ``fresh`` layers (a replaced stem), which keep their new initialisation.
    """
    state, where = _read_state_dict(str(weights), cache_dir)
    own = model.state_dict()
    fresh_prefixes = tuple(f"{layer}." for layer in fresh)
    state = {k: v for k, v in state.items() if not k.startswith(fresh_prefixes)}
    in_head = lambda key: key.startswith(head + ".")  # noqa: E731
    state = {k: v for k, v in state.items() if not (in_head(k) and k in own and own[k].shape != v.shape)}
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    if mismatched:
        raise WeightsError(
            f"{where} does not fit {type(model).__name__}; shape mismatches:\n  " + "\n  ".join(mismatched[:20])
        )
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not in_head(k) and not k.startswith(fresh_prefixes)]
    if missing or result.unexpected_keys:
        raise WeightsError(
            f"{where} does not match the backbone: missing {missing[:10]} ({len(missing)} in all), unexpected "
            f"{result.unexpected_keys[:10]} ({len(result.unexpected_keys)} in all). Only the head ({head}) may be "
            "missing; check model.backbone matches the file."
        )
    head_missing = [k for k in result.missing_keys if in_head(k)]
    log.info(
        "Loaded %d tensors from %s; new head %s %s",
        len(state),
        where,
        head,
        "initialised" if head_missing else "loaded",
    )
