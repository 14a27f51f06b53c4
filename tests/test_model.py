"""Model: backbone factory, pretrained-weight loading from files, a learning step, fine-tuning schedule."""

from __future__ import annotations

import collections
import functools
import itertools
import urllib.error
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dogbreed.callbacks import BackboneFreezeUnfreeze
from dogbreed.models import DogBreedClassifier, WeightsError, create_backbone
from dogbreed.models.backbone import BackboneError, backbone_kwargs_spec, build_backbone_kwargs
from dogbreed.models.schedulers import cosine_with_warmup, step_decay


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v2", "efficientnet_b0"])
def test_logits_have_one_column_per_class_and_no_nans(backbone):
    model = DogBreedClassifier(num_classes=7, backbone=backbone, weights=None).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()


def test_one_optimisation_step_lowers_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = DogBreedClassifier(num_classes=5, weights=None, lr=1e-3)
    model.train()
    x, y = torch.randn(8, 3, 64, 64), torch.arange(8) % 5
    optimizer = model.optimizer_factory(model.parameters(), lr=1e-3, weight_decay=0.0)
    losses = []
    for _ in range(2):
        loss = model.criterion(model(x), y)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[1] < losses[0]


def test_unknown_backbone_lists_the_choices():
    with pytest.raises(ValueError, match=r"not a torchvision classification model; choose from .*resnet18"):
        create_backbone("resnet19", 3)


def test_unknown_weights_name_lists_the_choices():
    with pytest.raises(WeightsError, match="choose from \\['IMAGENET1K_V1'\\]"):
        create_backbone("resnet18", 3, "IMAGENET22K")


def test_no_network_fails_fast_with_how_to_supply_a_file(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache: torchvision must download

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsError, match=r"model.weights=/path/to/resnet18-f37072fd.pth"):
        create_backbone("resnet18", 133, "IMAGENET1K_V1")


def test_real_pretrained_backbone_loads_from_a_file_with_only_the_head_missing(caplog, mobilenet_weights):
    bn = functools.partial(nn.BatchNorm2d, eps=1e-3)
    file_state = torch.load(mobilenet_weights, weights_only=True)
    model, head = create_backbone("mobilenet_v2", 133, str(mobilenet_weights), norm_layer=bn)
    assert head == "classifier.1"
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in file_state.items())
    assert model(torch.rand(1, 3, 96, 96)).shape == (1, 133)


def test_a_file_that_does_not_fit_fails_with_the_mismatched_shapes(tmp_path, mobilenet_weights):
    state = torch.load(mobilenet_weights, weights_only=True)
    state["features.0.0.weight"] = torch.zeros(16, 3, 3, 3)
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(WeightsError, match=r"features.0.0.weight: file \(16, 3, 3, 3\) vs model \(32, 3, 3, 3\)"):
        create_backbone("mobilenet_v2", 10, str(bad))


def test_a_file_for_another_backbone_names_the_missing_keys(mobilenet_weights):
    with pytest.raises(WeightsError, match=r"does not match the backbone: missing \['conv1.weight'"):
        create_backbone("resnet18", 10, str(mobilenet_weights))


def test_full_checkpoint_with_imagenet_head_is_accepted_and_head_replaced(tmp_path):
    source, _ = create_backbone("resnet18", 1000)
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")
    model, _ = create_backbone("resnet18", 133, str(tmp_path / "resnet18.pth"))
    assert model.fc.out_features == 133
    assert torch.equal(model.conv1.weight, source.conv1.weight)


def test_small_stem_keeps_28px_maps_large_and_loads_every_other_pretrained_layer(tmp_path):
    source, _ = create_backbone("resnet18", 1000)
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")
    model, _ = create_backbone("resnet18", 10, str(tmp_path / "resnet18.pth"), stem="small")
    assert (model.conv1.kernel_size, model.conv1.stride) == ((3, 3), (1, 1))
    assert torch.equal(model.layer1[0].conv1.weight, source.layer1[0].conv1.weight)
    maps = {}
    model.layer4.register_forward_hook(lambda m, i, out: maps.update(layer4=out.shape[-1]))
    model.eval()(torch.randn(1, 3, 28, 28))
    assert maps["layer4"] == 2  # 28 -> 14 (max-pool) -> 7 -> 4 -> 2; the ImageNet stem leaves 1x1
    with pytest.raises(ValueError, match=r"model.stem=small needs a ResNet-style backbone.*mobilenet_v2"):
        create_backbone("mobilenet_v2", 10, stem="small")
    with pytest.raises(ValueError, match=r"model.stem='tiny' is not a stem; choose from \['imagenet', 'small'\]"):
        create_backbone("resnet18", 10, stem="tiny")


def test_backbone_kwargs_build_plain_values_and_torch_nn_classes_only():
    built = build_backbone_kwargs(
        {"dropout": 0.2, "sizes": [1, 2], "norm_layer": {"_target_": "torch.nn.BatchNorm2d", "_partial_": True,
                                                          "eps": 1e-3}}
    )  # fmt: skip
    assert built["dropout"] == 0.2 and built["sizes"] == [1, 2]
    assert built["norm_layer"](4).eps == 1e-3 and isinstance(built["norm_layer"](4), nn.BatchNorm2d)
    assert isinstance(build_backbone_kwargs({"act": {"_target_": "torch.nn.modules.activation.ReLU"}})["act"], nn.ReLU)
    for target in ("os.system", "torch.nn.functional.relu", "torch.nn.nowhere.Module", "torch.load"):
        with pytest.raises(BackboneError, match=rf"model.backbone_kwargs.layer._target_='{target}' is not a torch.nn"):
            build_backbone_kwargs({"layer": {"_target_": target, "_partial_": True}})
    with pytest.raises(BackboneError, match=r"model.backbone_kwargs.norm_layer is a partial; .* must be plain"):
        build_backbone_kwargs({"norm_layer": functools.partial(nn.BatchNorm2d, eps=1e-3)})
    built = {"norm_layer": functools.partial(nn.BatchNorm2d, eps=1e-3), "dropout": 0.2}
    spec = backbone_kwargs_spec(built)
    assert build_backbone_kwargs(spec)["norm_layer"](4).eps == 1e-3 and backbone_kwargs_spec(spec) == spec
    with pytest.raises(BackboneError, match=r"norm_layer._target_='collections.OrderedDict' is not a torch.nn"):
        backbone_kwargs_spec({"norm_layer": functools.partial(collections.OrderedDict, a=1)})


@pytest.mark.parametrize("runtime", ["eager", pytest.param("export", marks=pytest.mark.slow), "torchscript"])
def test_a_model_built_with_backbone_kwargs_is_served_as_it_was_trained(tmp_path, runtime):
    """BatchNorm eps is in no state dict: a served model rebuilt without the recorded arguments answers otherwise."""
    from dogbreed.artifacts import read_model_dir, write_model_dir
    from dogbreed.serve.package import build_package, extract_package
    from dogbreed.serve.runtime import load_model
    from dogbreed.transforms import Preprocessing

    spec = {"norm_layer": {"_target_": "torch.nn.BatchNorm2d", "_partial_": True, "eps": 0.1}}
    torch.manual_seed(0)
    net, head = create_backbone("resnet18", 3, **build_backbone_kwargs(spec))
    nn.init.normal_(net.get_submodule(head).weight, std=0.5)  # distinct logits
    model_dir = write_model_dir(
        tmp_path / "model", net, backbone="resnet18", backbone_kwargs=spec, class_names=["a", "b", "c"],
        preprocessing=Preprocessing(image_size=32, resize_size=32),
    )  # fmt: skip
    pixels = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        want = net.eval()(pixels).softmax(1)
        md = read_model_dir(model_dir)
        md.backbone_kwargs = {}
        assert not torch.allclose(md.network()(pixels).softmax(1), want, atol=1e-2)  # the test can fail
    exports = [runtime] if runtime != "eager" else []
    root = extract_package(build_package(model_dir.parent, tmp_path / "m.tar.gz", exports=exports), tmp_path / "pkg")
    assert torch.allclose(load_model(root, runtime=runtime).predict(pixels), want, atol=1e-5)


def test_a_checkpoint_of_a_model_with_a_norm_layer_partial_loads_with_weights_only_and_the_same_eps(tmp_path):
    model = DogBreedClassifier(num_classes=3, backbone="mobilenet_v2", weights=None,
                               backbone_kwargs={"norm_layer": functools.partial(nn.BatchNorm2d, eps=1e-3)})  # fmt: skip
    trainer = L.Trainer(max_epochs=0, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    checkpoint = torch.load(tmp_path / "m.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["backbone_kwargs"] == {
        "norm_layer": {"_target_": "torch.nn.modules.batchnorm.BatchNorm2d", "_partial_": True, "eps": 1e-3}
    }
    loaded = DogBreedClassifier.load_from_checkpoint(tmp_path / "m.ckpt", weights_only=True)
    assert {m.eps for m in loaded.net.modules() if isinstance(m, nn.BatchNorm2d)} == {1e-3}


def test_files_are_loaded_without_unpickling_code(tmp_path):
    torch.save({"conv1.weight": torch.zeros(1), "evil": functools.partial(print, "pwned")}, tmp_path / "x.pth")
    with pytest.raises(Exception, match=r"Weights only load failed|Unsupported global"):
        create_backbone("resnet18", 3, str(tmp_path / "x.pth"))


def test_schedules_warm_up_decay_and_step():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    cosine = cosine_with_warmup(opt, total_steps=100, warmup_fraction=0.1)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        cosine.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[-1] < 0.01 and all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    step = step_decay(opt, total_steps=10, milestones=[0.5], gamma=0.1)
    for _ in range(5):
        opt.step()
        step.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


def test_backbone_stays_frozen_until_the_unfreeze_epoch_then_trains(tmp_path):
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(16, 3, 32, 32), torch.arange(16) % 4)
    model = DogBreedClassifier(num_classes=4, weights=None, lr=1e-2)
    snapshots = {}

    class Snapshot(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            snapshots[trainer.current_epoch] = (
                pl_module.net.conv1.weight.detach().clone(),
                pl_module.net.fc.weight.detach().clone(),
            )

    start = model.net.conv1.weight.detach().clone()
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        callbacks=[BackboneFreezeUnfreeze(unfreeze_at_epoch=1, backbone_lr_factor=0.5), Snapshot()],
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, DataLoader(data, batch_size=8))
    assert torch.equal(snapshots[0][0], start)  # frozen in epoch 0
    assert not torch.equal(snapshots[1][0], start)  # trains from epoch 1
    groups = trainer.optimizers[0].param_groups
    assert len(groups) == 3 and groups[2]["lr"] == pytest.approx(groups[0]["lr"] * 0.5, rel=0.3)


def test_channels_last_model_accepts_plain_batches():
    model = DogBreedClassifier(num_classes=3, weights=None, channels_last=True).eval()
    assert model.net.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_weights_path_resolves_user_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    source, _ = create_backbone("resnet18", 3)
    torch.save(source.state_dict(), Path(tmp_path) / "w.pth")
    model, _ = create_backbone("resnet18", 3, "~/w.pth")
    assert torch.equal(model.fc.weight, source.fc.weight)


def test_weights_from_s3_are_fetched_once_into_the_cache(aws_env, tmp_path):
    import boto3

    source, _ = create_backbone("resnet18", 1000)
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="weights")
    s3.upload_file(str(tmp_path / "resnet18.pth"), "weights", "models/resnet18.pth")
    model, _ = create_backbone("resnet18", 5, "s3://weights/models/resnet18.pth", cache_dir=tmp_path / "cache")
    assert torch.equal(model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    s3.delete_object(Bucket="weights", Key="models/resnet18.pth")  # a second build needs no S3
    create_backbone("resnet18", 5, "s3://weights/models/resnet18.pth", cache_dir=tmp_path / "cache")


class _ScheduledNet(nn.Module):
    """Logits right for ``CORRECT[epoch]`` of the 4 validation images (all of them in the sanity check)."""

    CORRECT = {"sanity": 4, 0: 2, 1: 3, 2: 1, 3: 4, 4: 2}

    def __init__(self) -> None:
        super().__init__()
        self.zero = nn.Parameter(torch.zeros(()))  # something for the optimiser to step
        self.epoch: int | str = "sanity"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        labels, index = x[:, 0, 0, 0].long(), x[:, 0, 0, 1].long()
        predicted = torch.where(index < self.CORRECT[self.epoch], labels, (labels + 1) % 4)
        return nn.functional.one_hot(predicted, 4).float() * 5 + self.zero


class _RecordValidation(L.Callback):
    def __init__(self) -> None:
        self.seen: list[dict[str, float]] = []

    def on_validation_epoch_start(self, trainer, pl_module):
        pl_module.net.epoch = "sanity" if trainer.sanity_checking else trainer.current_epoch

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.seen.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")})


def _scheduled_fit(
    tmp_path: Path, max_epochs: int, ckpt_path: Path | None = None, model: DogBreedClassifier | None = None
) -> list[dict[str, float]]:
    x = torch.zeros(4, 3, 8, 8)
    x[:, 0, 0, 0], x[:, 0, 0, 1] = torch.tensor([0.0, 1, 2, 3]), torch.arange(4.0)
    loader = DataLoader(TensorDataset(x, torch.arange(4)), batch_size=4)
    if model is None:
        model = DogBreedClassifier(num_classes=4, weights=None)
        model.net = _ScheduledNet()
    record = _RecordValidation()
    trainer = L.Trainer(
        max_epochs=max_epochs, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=1, default_root_dir=tmp_path, callbacks=[record],
    )  # fmt: skip
    trainer.fit(model, loader, loader, ckpt_path=ckpt_path)
    return record.seen


def test_best_so_far_metrics_are_running_extremes_without_the_sanity_check(tmp_path):
    model = DogBreedClassifier(num_classes=4, weights=None)
    model.net = _ScheduledNet()
    seen = _scheduled_fit(tmp_path, max_epochs=5, model=model)
    acc = [s["val/acc"] for s in seen]
    assert acc == [0.5, 0.75, 0.25, 1.0, 0.5]  # the schedule took effect; the sanity check (1.0) is not an epoch
    assert [s["val/acc_best"] for s in seen] == [0.5, 0.75, 0.75, 1.0, 1.0]
    loss = [s["val/loss"] for s in seen]
    assert [s["val/loss_best"] for s in seen] == pytest.approx([min(loss[: i + 1]) for i in range(5)])
    assert loss[2] > loss[1]  # the loss got worse in an epoch, so the running minimum is tested
    # fitting the same module again starts from no best value
    assert [s["val/acc_best"] for s in _scheduled_fit(tmp_path / "again", max_epochs=1, model=model)] == [0.5]


def test_a_resumed_fit_keeps_the_best_values_from_before(tmp_path):
    _scheduled_fit(tmp_path, max_epochs=4)  # best val/acc 1.0 in epoch 3
    (last,) = tmp_path.glob("**/epoch=3*.ckpt")
    seen = _scheduled_fit(tmp_path / "resumed", max_epochs=5, ckpt_path=last)
    assert [(s["val/acc"], s["val/acc_best"]) for s in seen] == [(0.5, 1.0)]


def test_compile_keeps_the_state_dict_keys():
    plain = DogBreedClassifier(num_classes=3, weights=None)
    compiled = DogBreedClassifier(num_classes=3, weights=None, compile=True)
    assert list(compiled.net.state_dict()) == list(plain.net.state_dict())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_compiled_channels_last_model_runs_under_autocast():
    model = DogBreedClassifier(num_classes=3, weights=None, channels_last=True, compile=True).cuda()
    x = torch.randn(4, 3, 64, 64, device="cuda")
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    with torch.autocast("cuda", dtype=dtype):
        assert model(x).shape == (4, 3)
