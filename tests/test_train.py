"""End to end: the demo trains, tests, exports; an interrupted run resumes; the CLI speaks clearly."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import open_dict

from dogbreed.artifacts import read_model_dir
from dogbreed.train import train

from .conftest import DATA, compose_config

DEMO_MIN_TEST_ACC = 0.5  # 10 classes: chance is 0.1; three epochs reach about 0.7


@pytest.mark.slow
def test_demo_trains_tests_and_exports(demo_cfg, tmp_path):
    with open_dict(demo_cfg):
        demo_cfg.trainer.max_epochs = 3
        for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches"):
            demo_cfg.trainer.pop(key)
    metrics = train(demo_cfg)
    run = Path(demo_cfg.paths.output_dir)
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["test/acc"] == pytest.approx(metrics["test/acc"])
    assert saved["test/acc"] >= DEMO_MIN_TEST_ACC, saved
    assert set(saved["test/per_class_acc"]) == {"T-shirt_top", "Trouser", "Pullover", "Dress", "Coat",
                                                "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot"}  # fmt: skip
    assert {"test/acc_top5", "test/f1_macro", "test/loss"} <= set(saved)
    assert metrics["objective"] == pytest.approx(metrics["best_val/acc"])
    assert metrics["val/acc_best"] == pytest.approx(metrics["best_val/acc"])  # what SageMaker's tuner scores
    assert (run / "confusion_matrix.png").stat().st_size > 1000
    assert len((run / "confusion_matrix.csv").read_text().splitlines()) == 11
    data_report = json.loads((run / "data-report.json").read_text())  # the run keeps its own copy
    assert data_report["excluded"] == [] and sum(data_report["counts"]["train"]) == 1500
    exported = read_model_dir(run / "model")
    assert exported.class_names[0] == "T-shirt_top" and exported.preprocessing.image_size == 40
    assert (run / "checkpoints" / "last.ckpt").is_file()
    (logged,) = run.glob("csv/version_*/metrics.csv")
    assert "val/acc" in logged.read_text().splitlines()[0]


class _Crash(RuntimeError):
    pass


class _CrashMidEpoch(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 1 and batch_idx == 2:
            raise _Crash("killed mid-epoch")


class _EpochsStarted(L.Callback):
    def __init__(self) -> None:
        self.started: list[int] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.started.append(trainer.current_epoch)


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_without_redoing_finished_epochs(demo_cfg):
    with open_dict(demo_cfg):
        demo_cfg.trainer.max_epochs = 3
    with pytest.raises(_Crash):
        train(demo_cfg, extra_callbacks=[_CrashMidEpoch()])
    last = Path(demo_cfg.paths.checkpoint_dir) / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 0  # the last finished epoch, whether best or not
    with open_dict(demo_cfg):
        demo_cfg.ckpt_path = str(last)
    seen = _EpochsStarted()
    train(demo_cfg, extra_callbacks=[seen])
    assert seen.started == [1, 2]  # epoch 0 finished before the crash and is not redone
    assert len(list(Path(demo_cfg.paths.output_dir).glob("csv/version_*/metrics.csv"))) == 2  # no log overwritten
    saved = json.loads(Path(demo_cfg.paths.output_dir, "metrics.json").read_text())
    assert saved["epochs"] == 3
    assert torch.load(last, weights_only=True)["epoch"] == 2
    assert Path(saved["best_checkpoint"]).name.startswith("epoch_")  # tested and exported: the best, not the last


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dogbreed.train", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


@pytest.mark.slow
def test_cli_prints_the_composed_config(tmp_path):
    done = _cli("experiment=demo", "--cfg", "job", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "_target_: dogbreed.data.DogBreedDataModule" in done.stdout
    assert "num_classes: ${data.num_classes}" in done.stdout


@pytest.mark.slow
def test_cli_help_lists_the_config_groups(tmp_path):
    done = _cli("--help", cwd=tmp_path)
    assert done.returncode == 0
    assert "experiment: demo, dogimages" in done.stdout and "trainer: cpu, ddp, default, gpu" in done.stdout


@pytest.mark.slow
def test_cli_bad_source_is_one_clear_line_not_a_traceback(tmp_path):
    done = _cli("experiment=demo", f"data.source={tmp_path}/nowhere", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert done.returncode == 2
    assert "does not exist: give a folder in the dogImages layout" in done.stderr + done.stdout
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_cli_refuses_backbone_kwargs_serving_cannot_rebuild_before_training(tmp_path):
    done = _cli(
        "experiment=demo", "+model.backbone_kwargs.norm_layer._target_=collections.OrderedDict",
        "+model.backbone_kwargs.norm_layer._partial_=true", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2
    assert "model.backbone_kwargs.norm_layer._target_='collections.OrderedDict' is not a torch.nn" in done.stdout
    assert "Traceback" not in done.stderr and not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_demo_trains_to_the_same_accuracy_band_with_the_fast_options(demo_cfg):
    torch.set_num_threads(1)  # one thread is faster than two fighting other processes on a small CI machine
    with open_dict(demo_cfg):
        demo_cfg.trainer.max_epochs = 1  # one full epoch reaches about 0.65, clear of the band
        for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches"):
            demo_cfg.trainer.pop(key)
        demo_cfg.data.update(decoder="torchvision", cache=True, device_augment=True)
    metrics = train(demo_cfg)
    assert metrics["test/acc"] >= DEMO_MIN_TEST_ACC, metrics
    assert list(Path(demo_cfg.paths.cache_dir).rglob(DATA)), "the demo did not use the decoded-image cache"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_preset_trains_the_demo_with_amp_channels_last_cache_and_device_augmentation(tmp_path):
    cfg = compose_config(["experiment=demo", "preset=gpu"])
    with open_dict(cfg):
        cfg.paths.update(output_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"))
        cfg.paths.model_dir = str(tmp_path / "run" / "model")
        cfg.trainer.update(max_epochs=1, limit_train_batches=8, limit_val_batches=2, limit_test_batches=2)
        cfg.trainer.enable_progress_bar = False
        cfg.callbacks.pop("progress_bar", None)
        cfg.data.num_workers = 1
    assert cfg.trainer.accelerator == "gpu" and cfg.data.device_augment == "auto" and cfg.data.cache
    metrics = train(cfg)
    assert cfg.data.pin_memory and cfg.data.persistent_workers
    assert cfg.trainer.precision in ("bf16-mixed", "16-mixed") and cfg.model.channels_last
    assert math.isfinite(metrics["test/loss"])
