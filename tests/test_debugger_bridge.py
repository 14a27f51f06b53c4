"""The SageMaker bridge: smdebug's hook only inside a Debugger-enabled job, and the numpy-2 fix.

smdebug cannot be installed beside the dev extra (see dogbreed.callbacks.smdebug_bridge): where it would be
imported, a stand-in plays it; a job without it runs for real."""

from __future__ import annotations

import importlib.util
import logging
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from torch import nn

from dogbreed.callbacks.smdebug_bridge import SMDebugBridge, patch_smdebug_for_numpy2, register_smdebug_hook


def fake_util_module() -> types.ModuleType:
    """A stand-in for ``smdebug.core.tfevent.util`` as released: it calls ``ndarray.tostring()``."""
    util = types.ModuleType("smdebug.core.tfevent.util")

    def make_tensor_proto(nparray_data: np.ndarray, tag: str) -> dict[str, Any]:
        return {"tag": tag, "tensor_content": nparray_data.tostring(), "shape": nparray_data.shape}

    util.make_tensor_proto = make_tensor_proto
    return util


@pytest.mark.skipif(hasattr(np.ndarray, "tostring"), reason="numpy < 2 still has ndarray.tostring")
def test_numpy2_patch_makes_smdebug_write_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    util = fake_util_module()
    writer = types.ModuleType("smdebug.core.tfevent.event_file_writer")
    writer.make_tensor_proto = util.make_tensor_proto  # imported by name, as smdebug's writer does
    monkeypatch.setitem(sys.modules, "smdebug.core.tfevent.util", util)
    monkeypatch.setitem(sys.modules, "smdebug.core.tfevent.event_file_writer", writer)
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    with pytest.raises(AttributeError, match="tostring"):
        util.make_tensor_proto(array, "w")

    assert patch_smdebug_for_numpy2(util) is True
    proto = writer.make_tensor_proto(array, "w")
    assert proto["tensor_content"] == array.tobytes() and proto["shape"] == (2, 3)
    assert util.make_tensor_proto is writer.make_tensor_proto
    assert patch_smdebug_for_numpy2(util) is False  # idempotent


class FakeHook:
    created_from: str | None = None

    def __init__(self) -> None:
        self.modules: list[nn.Module] = []
        self.losses: list[nn.Module] = []

    @classmethod
    def create_from_json_file(cls, path: str) -> FakeHook:
        hook = cls()
        hook.created_from = path
        return hook

    def register_module(self, module: nn.Module) -> None:
        self.modules.append(module)

    def register_loss(self, loss: nn.Module) -> None:
        self.losses.append(loss)


@pytest.fixture
def fake_smdebug(monkeypatch: pytest.MonkeyPatch) -> None:
    package = types.ModuleType("smdebug")
    pytorch = types.ModuleType("smdebug.pytorch")
    pytorch.Hook = FakeHook
    monkeypatch.setitem(sys.modules, "smdebug", package)
    monkeypatch.setitem(sys.modules, "smdebug.pytorch", pytorch)
    monkeypatch.setitem(sys.modules, "smdebug.core.tfevent.util", fake_util_module())


@pytest.fixture
def hook_config(tmp_path: Path) -> Path:
    path = tmp_path / "debughookconfig.json"
    path.write_text('{"LocalPath": "/opt/ml/output/tensors"}')
    return path


@pytest.fixture
def in_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAINING_JOB_NAME", "dogbreed-2026-01-01")


def test_hook_registered_in_a_debugger_job(fake_smdebug: None, hook_config: Path, in_job: None) -> None:
    model, loss = nn.Linear(2, 2), nn.CrossEntropyLoss()
    hook = register_smdebug_hook(model, loss, hook_config)
    assert isinstance(hook, FakeHook) and hook.created_from == str(hook_config)
    assert hook.modules == [model] and hook.losses == [loss]


def test_nothing_outside_sagemaker(fake_smdebug: None, hook_config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRAINING_JOB_NAME", raising=False)
    monkeypatch.delenv("SM_TRAINING_ENV", raising=False)
    assert register_smdebug_hook(nn.Linear(2, 2), None, hook_config) is None


def test_nothing_without_a_debugger_config(fake_smdebug: None, tmp_path: Path, in_job: None) -> None:
    assert register_smdebug_hook(nn.Linear(2, 2), None, tmp_path / "missing.json") is None


def test_a_debugger_job_without_smdebug_trains_and_says_why(
    hook_config: Path, in_job: None, caplog: pytest.LogCaptureFixture
) -> None:
    """For real, no stand-in: smdebug cannot be installed beside SageMaker's training toolkit (see
    dogbreed.callbacks.smdebug_bridge), so a Debugger-enabled job trains with dogbreed's rules alone."""
    from .test_debugger import tiny_fit

    assert importlib.util.find_spec("smdebug") is None, "smdebug imports here: this test expects the dev install"
    bridge = SMDebugBridge(hook_config=hook_config)
    with caplog.at_level(logging.INFO, logger="dogbreed.callbacks.smdebug_bridge"):
        trainer = tiny_fit([bridge])
    assert bridge.hook is None and trainer.current_epoch == 1 and trainer.global_step > 0
    assert "Debugger hook config but smdebug is not installed" in caplog.text


def test_the_default_callbacks_hold_the_bridge() -> None:
    """Every run composes it; it does nothing outside a Debugger-enabled job."""
    from hydra.utils import instantiate

    from .conftest import compose_config

    bridge = instantiate(compose_config().callbacks.smdebug_bridge)
    assert isinstance(bridge, SMDebugBridge) and str(bridge.hook_config) == "/opt/ml/input/config/debughookconfig.json"


def test_bridge_callback_registers_the_lightning_module(fake_smdebug: None, hook_config: Path, in_job: None) -> None:
    from .test_debugger import TinyClassifier, tiny_fit

    bridge = SMDebugBridge(hook_config=hook_config)
    model = TinyClassifier()
    tiny_fit([bridge], model=model)
    assert bridge.hook.modules == [model] and bridge.hook.losses == [model.criterion]
