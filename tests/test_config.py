"""Every option of every config group composes and instantiates."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import open_dict

from dogbreed import DogBreedClassifier, DogBreedDataModule
from dogbreed.config import CONFIG_DIR
from dogbreed.train import instantiate_group

from .conftest import compose_config, make_small


def options(group: str) -> list[str]:
    return sorted(
        p.relative_to(CONFIG_DIR / group).with_suffix("").as_posix() for p in (CONFIG_DIR / group).glob("*.yaml")
    )


def test_groups_are_discovered():
    assert {"demo", "dogimages"} <= set(options("data"))
    assert {"cpu", "gpu", "ddp", "default"} <= set(options("trainer"))


@pytest.mark.parametrize("option", options("data"))
def test_data_options(option, tmp_path):
    cfg = make_small(compose_config([f"data={option}"]), tmp_path)
    dm = instantiate(cfg.data)
    assert isinstance(dm, DogBreedDataModule)
    assert dm.preprocessing.image_size == cfg.data.image_size


@pytest.mark.parametrize("option", options("model/optimizer"))
@pytest.mark.parametrize("scheduler", options("model/scheduler"))
def test_model_optimizer_and_scheduler_options(option, scheduler, tmp_path):
    cfg = make_small(
        compose_config([f"model/optimizer={option}", f"model/scheduler={scheduler}", "model.weights=null"]), tmp_path
    )
    model = instantiate(cfg.model)
    assert isinstance(model, DogBreedClassifier) and model.hparams.num_classes == 133
    trainer = L.Trainer(max_steps=10, accelerator="cpu", logger=False)
    model.trainer = trainer
    configured = model.configure_optimizers()
    optimizer = configured["optimizer"] if isinstance(configured, dict) else configured
    assert type(optimizer).__name__.lower() == option
    assert isinstance(configured, dict) == (scheduler != "constant")


@pytest.mark.parametrize("option", options("callbacks"))
def test_callback_options(option, tmp_path):
    cfg = compose_config([f"callbacks={option}", f"paths.output_dir={tmp_path}"])
    callbacks = instantiate_group(cfg.callbacks, "callback")
    assert all(isinstance(c, L.Callback) for c in callbacks)
    assert (len(callbacks) > 0) == (option != "none")
    if option in ("default", "finetuning"):
        assert any(type(c).__name__ == "ModelCheckpoint" for c in callbacks)


@pytest.mark.parametrize("option", options("logger"))
def test_logger_options(option, tmp_path, monkeypatch):
    """Every logger option builds (tensorboard, mlflow and many need their extras, part of dev)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")  # not ./mlflow.db
    cfg = make_small(compose_config([f"logger={option}"]), tmp_path)
    loggers = instantiate_group(cfg.logger, "logger")
    assert (len(loggers) > 0) == (option != "none")
    assert (option in ("tensorboard", "many")) == any(type(lg).__name__ == "TensorBoardLogger" for lg in loggers)
    assert (option in ("mlflow", "many")) == any(type(lg).__name__ == "MLflowRunLogger" for lg in loggers)
    if option == "mlflow":  # the reports read the CSV logger's metrics.csv: MLflow comes in addition
        assert any(type(lg).__name__ == "CSVLogger" for lg in loggers)


@pytest.mark.parametrize("option", options("trainer"))
def test_trainer_options(option, tmp_path):
    cfg = compose_config([f"trainer={option}"])
    if option == "gpu" or (option == "ddp" and torch.cuda.is_available()):  # ddp: a GPU where there is one
        assert cfg.trainer.precision in ("bf16-mixed", "16-mixed")
        assert option != "gpu" or cfg.trainer.benchmark
    default = compose_config([])
    assert (cfg.model, cfg.data) == (default.model, default.data)  # a trainer option builds the Trainer only
    cfg = make_small(cfg, tmp_path)  # the CI machine has no GPU: build the same Trainer on the CPU
    if option in ("gpu", "ddp"):
        assert cfg.trainer.precision == "32-true"  # no mixed precision on a CPU
        with open_dict(cfg):
            cfg.trainer.devices = 2 if option == "ddp" else 1
    trainer = instantiate(cfg.trainer)
    assert isinstance(trainer, L.Trainer)


@pytest.mark.parametrize("experiment", [[], ["experiment=demo"]])
def test_gpu_preset_composes_trainer_gpu_with_model_and_data_speed_settings(experiment, tmp_path):
    cfg = compose_config([*experiment, "preset=gpu"])
    assert cfg.trainer == compose_config([*experiment, "trainer=gpu"]).trainer
    assert cfg.trainer.precision in ("bf16-mixed", "16-mixed")
    assert cfg.model.channels_last and cfg.trainer.benchmark
    assert cfg.data.pin_memory and cfg.data.persistent_workers and cfg.data.num_workers == "auto"
    trainer = instantiate(make_small(cfg, tmp_path).trainer)  # the CI machine has no GPU: built on the CPU
    assert isinstance(trainer, L.Trainer)


@pytest.mark.parametrize("option", options("experiment"))
def test_experiment_options(option, tmp_path):
    cfg = make_small(compose_config([f"experiment={option}"]), tmp_path)
    assert cfg.model.num_classes == cfg.data.num_classes
    dm = instantiate(cfg.data)
    assert isinstance(dm, DogBreedDataModule)


def test_demo_points_at_the_embedded_data():
    cfg = compose_config(["experiment=demo"])
    assert Path(cfg.data.source, "train", "001.T-shirt_top").is_dir()
    assert cfg.model.weights is None
