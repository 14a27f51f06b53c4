"""Register SageMaker Debugger's own hook (``smdebug``) inside a SageMaker job that asked for it.

SageMaker-side Debugger rules read tensors that ``smdebug``'s hook writes. The hook is registered only when
all three hold: the process runs in a SageMaker training job, the job has a Debugger hook configuration
(``/opt/ml/input/config/debughookconfig.json``), and ``smdebug`` imports. Otherwise nothing changes; our
own :class:`~dogbreed.callbacks.Debugger` runs in every case. ``smdebug`` is imported lazily and is not a
dependency of ``dogbreed``.

Where ``smdebug`` can be installed: its last release (1.0.34, 2023) pins ``protobuf>=3.20.0,<=3.20.3``. It
installs beside numpy 2 on its own, and its tensor writer then fails on ``ndarray.tostring``, which
:func:`patch_smdebug_for_numpy2` fixes (checked by hand against the real 1.0.34 writer: tensors written and
read back). It cannot be installed beside ``sagemaker-training`` 5 (``protobuf>=5.28.1``), the toolkit the
PyTorch training images start and the ``dev`` extra pins (pip: ResolutionImpossible), and older releases
without the pin fail to import under protobuf >= 4. So the hook registers only in an image built around
protobuf 3.20; the tests run the bridge against a stand-in ``smdebug``, and for real without one, as an image
with the toolkit runs it.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)

HOOK_CONFIG = "/opt/ml/input/config/debughookconfig.json"


class _TostringArray(np.ndarray):
    """An ndarray view that still answers ``tostring()``, which numpy 2 removed (it was ``tobytes()``)."""

    def tostring(self, order: str = "C") -> bytes:
        return self.tobytes(order)


def patch_smdebug_for_numpy2(util: ModuleType | None = None) -> bool:
    """Make ``smdebug`` (last release 2023) write tensors under numpy 2; return whether a patch was applied.

    ``smdebug.core.tfevent.util.make_tensor_proto`` calls ``ndarray.tostring()``. The patch wraps it so the
    array it receives is a view that has the method; every module that imported the function by name gets
    the wrapper too. A no-op on numpy 1 and when already patched.
    """
    if hasattr(np.ndarray, "tostring"):
        return False
    util = util or importlib.import_module("smdebug.core.tfevent.util")
    original = util.make_tensor_proto
    if getattr(original, "_dogbreed_numpy2", False):
        return False

    def make_tensor_proto(nparray_data: Any, tag: str) -> Any:
        if isinstance(nparray_data, np.ndarray):
            nparray_data = nparray_data.view(_TostringArray)
        return original(nparray_data, tag)

    make_tensor_proto._dogbreed_numpy2 = True  # type: ignore[attr-defined]
    for module in [util, *(m for n, m in list(sys.modules.items()) if n.startswith("smdebug.") and m is not None)]:
        if getattr(module, "make_tensor_proto", None) is original:
            module.make_tensor_proto = make_tensor_proto
    return True


def in_sagemaker_job() -> bool:
    """SageMaker sets ``TRAINING_JOB_NAME`` (and ``SM_TRAINING_ENV``) in every training container."""
    return bool(os.environ.get("TRAINING_JOB_NAME") or os.environ.get("SM_TRAINING_ENV"))


def register_smdebug_hook(model: Any, loss: Any = None, hook_config: str | Path = HOOK_CONFIG) -> Any | None:
    """Create smdebug's hook from the job's configuration and register ``model`` (and ``loss``); None when the
    job did not ask for Debugger or smdebug is not installed."""
    if not in_sagemaker_job() or not Path(hook_config).is_file():
        return None
    try:
        smd = importlib.import_module("smdebug.pytorch")
    except ImportError:
        log.info(
            "This SageMaker job has a Debugger hook config but smdebug is not installed: only dogbreed's rules run."
        )
        return None
    patch_smdebug_for_numpy2()
    hook = smd.Hook.create_from_json_file(str(hook_config))
    hook.register_module(model)
    if loss is not None:
        hook.register_loss(loss)
    log.info("Registered SageMaker Debugger's smdebug hook from %s", hook_config)
    return hook


class SMDebugBridge(Callback):
    """At fit start, register smdebug's hook on the model and its ``criterion`` when SageMaker asks for it.

    Args:
        hook_config: The Debugger hook configuration SageMaker writes into the container.
    """

    def __init__(self, hook_config: str | Path = HOOK_CONFIG) -> None:
        self.hook_config = hook_config
        self.hook: Any = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.hook is None:
            self.hook = register_smdebug_hook(pl_module, getattr(pl_module, "criterion", None), self.hook_config)
