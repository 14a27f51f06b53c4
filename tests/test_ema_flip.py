"""Test-time flip (model.test_time_flip) and the EMA of the weights (callbacks=[default,ema])."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from dogbreed.callbacks import EMAWeights
from dogbreed.callbacks.ema import ema_with_warmup
from dogbreed.models import DogBreedClassifier
from dogbreed.models.backbone import create_backbone


def test_test_time_flip_evaluates_the_mean_logits_of_the_image_and_its_mirror():
    torch.manual_seed(0)
    model = DogBreedClassifier(num_classes=3, weights=None, stem="small", test_time_flip=True).eval()
    x = torch.rand(2, 3, 28, 28)
    with torch.no_grad():
        want = (model(x) + model(x.flip(-1))) / 2
        assert torch.allclose(model.evaluate(x), want)
        assert not torch.allclose(model.evaluate(x), model(x))  # the mirror image changed the answer
        model.hparams.test_time_flip = False
        assert torch.equal(model.evaluate(x), model(x))


@pytest.mark.parametrize("runtime", ["eager", pytest.param("export", marks=pytest.mark.slow), "torchscript"])
def test_a_flip_tested_model_answers_with_flip_averaged_probabilities_when_served(tmp_path: Path, runtime):
    from dogbreed.artifacts import write_model_dir
    from dogbreed.serve.package import build_package, extract_package
    from dogbreed.serve.runtime import load_model
    from dogbreed.transforms import Preprocessing

    torch.manual_seed(0)
    net, _ = create_backbone("resnet18", num_classes=3, stem="small")
    model_dir = write_model_dir(
        tmp_path / "model", net, backbone="resnet18", stem="small", test_time_flip=True, class_names=["a", "b", "c"],
        preprocessing=Preprocessing(image_size=28, resize_size=28),
    )  # fmt: skip
    assert json.loads((model_dir / "model_config.json").read_text())["test_time_flip"] is True
    pixels = torch.rand(2, 3, 28, 28)
    with torch.no_grad():
        net.eval()
        want = ((net(pixels) + net(pixels.flip(-1))) / 2).softmax(1)
    exports = [runtime] if runtime != "eager" else []
    root = extract_package(build_package(model_dir.parent, tmp_path / "m.tar.gz", exports=exports), tmp_path / "pkg")
    assert torch.allclose(load_model(root, runtime=runtime).predict(pixels), want, atol=1e-5)


def test_model_dirs_written_before_the_option_answer_without_flip(tmp_path: Path):
    from dogbreed.artifacts import MODEL_CONFIG, read_model_dir, write_model_dir
    from dogbreed.transforms import Preprocessing

    net, _ = create_backbone("resnet18", num_classes=2)
    model_dir = write_model_dir(
        tmp_path, net, backbone="resnet18", class_names=["a", "b"], preprocessing=Preprocessing()
    )
    config = json.loads((model_dir / MODEL_CONFIG).read_text())
    del config["test_time_flip"]
    (model_dir / MODEL_CONFIG).write_text(json.dumps(config))
    assert read_model_dir(model_dir).test_time_flip is False


def test_ema_decay_warms_up_then_holds():
    average, current = torch.zeros(1), torch.ones(1)
    first = ema_with_warmup(average, current, torch.tensor(1), decay=0.999)
    assert first.item() == pytest.approx(1 - 2 / 11)  # (1 + 1) / (10 + 1) of the old average
    late = ema_with_warmup(average, current, torch.tensor(100_000), decay=0.999)
    assert late.item() == pytest.approx(0.001, rel=1e-4)
    with pytest.raises(ValueError, match=r"callbacks\.ema\.decay"):
        EMAWeights(decay=1.0)


def _fit_and_test(tmp_path: Path) -> tuple[DogBreedClassifier, ModelCheckpoint]:
    torch.manual_seed(0)
    x, y = torch.randn(32, 3, 16, 16), torch.arange(32) % 4
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    model = DogBreedClassifier(num_classes=4, weights=None, stem="small", lr=0.05)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="val/acc", mode="max")
    trainer = L.Trainer(
        max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[EMAWeights(decay=0.9), checkpoint], default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(model, loader, loader)
    trainer.test(model, loader, ckpt_path="best")
    return model, checkpoint


def test_testing_the_best_checkpoint_tests_its_averaged_weights(tmp_path: Path):
    model, checkpoint = _fit_and_test(tmp_path)
    saved = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)
    averaged, current = saved["state_dict"], saved["current_model_state"]
    key = "net.fc.weight"
    assert not torch.allclose(averaged[key], current[key])  # the average differs from the weights it averages
    # the tested (and exported) weights are the average that validation scored, not the current ones
    assert torch.equal(model.state_dict()[key], averaged[key])
