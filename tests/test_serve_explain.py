"""Grad-CAM (dogbreed/serve/explain.py) and ``explain`` in the handlers: hot where the evidence is, in [0, 1],
shaped like the input crop, no hook or gradient left behind, refused where there are no gradients."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from dogbreed.models.backbone import create_backbone
from dogbreed.serve.codec import InferenceError
from dogbreed.serve.explain import find_target_layer, grad_cam, heatmap_png, input_jpeg
from dogbreed.serve.handlers import input_fn, output_fn, predict_fn
from dogbreed.serve.package import extract_package
from dogbreed.serve.runtime import load_model

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT / "examples" / "images" / "Labrador_retriever_06457.jpg"


@pytest.fixture(autouse=True)
def _one_thread(_few_threads: None) -> None:
    torch.set_num_threads(1)  # see tests/test_serve_handlers.py


def two_detectors() -> nn.Module:
    """Class 0 is "red here", class 1 "green here": a 4x4-stride detector per colour, pooled, then identity."""
    net = nn.Sequential(
        nn.Conv2d(3, 2, kernel_size=4, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2)
    )
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].weight[0, 0] = 1 / 16  # channel 0: mean red of a 4x4 block
        net[0].weight[1, 1] = 1 / 16  # channel 1: mean green
        net[0].bias.fill_(-0.5)
        net[4].weight.copy_(torch.eye(2))
        net[4].bias.zero_()
    return net.eval()


def two_patches() -> torch.Tensor:
    """A red square top left (rows and columns 4-11) and a green one bottom right (20-27), on black."""
    image = torch.zeros(1, 3, 32, 32)
    image[0, 0, 4:12, 4:12] = 1
    image[0, 1, 20:28, 20:28] = 1
    return image


def no_hooks_left(net: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in net.modules())


RED, GREEN = (slice(4, 12), slice(4, 12)), (slice(20, 28), slice(20, 28))


@pytest.mark.parametrize(("index", "hot", "cold"), [(0, RED, GREEN), (1, GREEN, RED)])
def test_heat_map_is_hot_where_the_class_evidence_is(index: int, hot: tuple, cold: tuple) -> None:
    net = two_detectors()
    cam = grad_cam(net, two_patches(), [index])
    heatmap = cam.heatmaps[0]
    assert cam.layer == "1" and cam.classes == [index]  # the ReLU: the last 4-D output before pooling
    assert heatmap.shape == (32, 32) and heatmap.min() >= 0 and heatmap.max() == pytest.approx(1)
    row, col = divmod(int(heatmap.argmax()), 32)
    assert hot[0].start <= row < hot[0].stop and hot[1].start <= col < hot[1].stop
    assert heatmap[hot].mean() > 0.7 and heatmap[cold].max() < 0.05
    assert heatmap[:, 14:18].max() < 0.3  # far from both squares: cold


def test_no_hook_or_gradient_is_left_and_inference_mode_is_no_obstacle() -> None:
    net = two_detectors()
    with torch.inference_mode():  # as a server's forward function runs; Grad-CAM leaves it for its own pass
        cam = grad_cam(net, two_patches(), [0])
    assert cam.heatmaps.max() == pytest.approx(1)
    assert no_hooks_left(net)
    assert all(p.grad is None for p in net.parameters()) and not net.training
    assert not cam.heatmaps.requires_grad


def test_resnet18_explains_layer4_of_each_image() -> None:
    """A random ResNet-18 at 96 px (a 3x3 map at layer4): one heat map per image, each for its own class."""
    torch.manual_seed(0)
    net, _ = create_backbone("resnet18", num_classes=5)
    net.eval()
    pixels = torch.randn(2, 3, 96, 96)
    cam = grad_cam(net, pixels, [3, 1])
    assert cam.layer == "layer4" and cam.classes == [3, 1]
    assert cam.heatmaps.shape == (2, 96, 96)
    assert cam.heatmaps.min() >= 0 and torch.allclose(cam.heatmaps.amax(dim=(1, 2)), torch.ones(2))
    alone = grad_cam(net, pixels[1:], [1], layer="layer4").heatmaps[0]
    assert torch.allclose(alone, cam.heatmaps[1], atol=1e-5)  # images do not influence each other
    assert no_hooks_left(net) and all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize(
    ("name", "layer"), [("resnet18", "layer4"), ("mobilenet_v3_small", "features"), ("convnext_tiny", "features")]
)
def test_target_layer_of_torchvision_backbones(name: str, layer: str) -> None:
    """The last feature map before global pooling: not a squeeze-and-excitation block's pooling (MobileNetV3),
    nor the 4-D modules after it (ConvNeXt's head)."""
    net = torchvision.models.get_model(name, weights=None, num_classes=3).eval()
    assert find_target_layer(net, torch.randn(1, 3, 64, 64)) == layer
    assert no_hooks_left(net)


def test_a_network_without_feature_maps_is_refused() -> None:
    with pytest.raises(ValueError, match="convolutional backbone"):
        find_target_layer(nn.Sequential(nn.Flatten(), nn.Linear(12, 2)), torch.randn(1, 3, 2, 2))


def test_a_uniform_map_is_all_zero_not_nan() -> None:
    """A 1x1 feature map (a tiny input) locates nothing: zeros rather than a division by zero."""
    net = nn.Sequential(nn.Conv2d(3, 2, 4, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2))
    heatmap = grad_cam(net.eval(), torch.rand(1, 3, 4, 4), [0]).heatmaps[0]
    assert heatmap.shape == (4, 4) and torch.equal(heatmap, torch.zeros(4, 4))


def test_a_test_time_flip_answer_is_explained_for_both_passes() -> None:
    """Its answer for a mirrored photo is the same answer, so its map of the mirrored photo is the mirrored map.

    A ResNet's filters are not mirror-symmetric, so the plain map of one pass has no such symmetry.
    """
    torch.manual_seed(0)
    net, head = create_backbone("resnet18", num_classes=3)
    nn.init.normal_(net.get_submodule(head).weight, std=0.5)  # logits with gradients worth mapping
    net.eval()
    image = torch.rand(1, 3, 64, 64)

    def maps(mirrored: bool) -> tuple[torch.Tensor, torch.Tensor]:
        first = grad_cam(net, image, [1], mirrored=mirrored).heatmaps[0]
        return first, grad_cam(net, image.flip(-1), [1], mirrored=mirrored).heatmaps[0]

    plain, plain_of_mirror = maps(False)
    assert (plain_of_mirror - plain.flip(-1)).abs().max() > 0.05
    both, both_of_mirror = maps(True)
    assert torch.allclose(both_of_mirror, both.flip(-1), atol=1e-5)
    assert both.min() == 0 and both.max() == pytest.approx(1)


def test_heat_map_and_crop_encode_faithfully() -> None:
    heatmap = torch.linspace(0, 1, 64).reshape(8, 8)
    grey = np.asarray(Image.open(io.BytesIO(heatmap_png(heatmap))))
    assert grey.shape == (8, 8) and grey.dtype == np.uint8 and grey[0, 0] == 0 and grey[-1, -1] == 255
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    ramp = torch.linspace(0.1, 0.9, 16)
    rgb = torch.stack([ramp[:, None].expand(16, 16), ramp[None, :].expand(16, 16), torch.full((16, 16), 0.5)])
    pixels = (rgb - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    crop = np.asarray(Image.open(io.BytesIO(input_jpeg(pixels, mean, std))))
    assert crop.shape == (16, 16, 3) and np.abs(crop / 255 - rgb.permute(1, 2, 0).numpy()).mean() < 0.05


# --- through the handlers: the JSON field, the answer's shape, the runtimes without gradients ----------------


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def ask(model, payload: dict) -> dict:
    body, _ = output_fn(predict_fn(input_fn(json.dumps(payload), "application/json"), model), "application/json")
    return json.loads(body)


def decode_png(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))))


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path):
    return load_model(tiny_model_dir, device="cpu")


def test_explain_adds_an_explanation_and_changes_nothing_else(model) -> None:
    plain = ask(model, {"image": b64(PHOTO)})
    explained = ask(model, {"image": b64(PHOTO), "explain": True})
    assert set(plain) == {"predictions"} and ask(model, {"image": b64(PHOTO), "explain": False}) == plain
    assert explained["predictions"] == plain["predictions"]
    explanation = explained["explanation"]
    top = plain["predictions"][0]
    assert (explanation["label"], explanation["index"]) == (top["label"], top["index"])
    assert explanation["method"] == "grad-cam" and explanation["layer"] == "layer4"
    size = model.preprocessing.image_size
    heatmap = decode_png(explanation["heatmap_png"])
    assert heatmap.shape == (size, size) and heatmap.dtype == np.uint8
    assert decode_png(explanation["input_jpeg"]).shape == (size, size, 3)
    assert no_hooks_left(model.net) and all(p.grad is None for p in model.net.parameters())


def test_a_flip_tested_model_explains_a_mirrored_photo_with_the_mirrored_map(tiny_model_dir: Path, tmp_path) -> None:
    from dogbreed.artifacts import read_model_dir, write_model_dir

    md = read_model_dir(tiny_model_dir)
    flip_dir = write_model_dir(
        tmp_path / "model", md.network(), backbone=md.backbone, class_names=md.class_names,
        preprocessing=md.preprocessing, test_time_flip=True,
    )  # fmt: skip
    flip_model = load_model(flip_dir, device="cpu")
    photo = Image.open(PHOTO).convert("RGB")
    maps = []
    for image in (photo, photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)):
        buffer = io.BytesIO()
        image.save(buffer, "PNG")  # lossless: the mirrored photo is exactly the mirror image
        explained = ask(flip_model, {"image": base64.b64encode(buffer.getvalue()).decode(), "explain": True})
        maps.append(decode_png(explained["explanation"]["heatmap_png"]).astype(int))
    assert np.abs(maps[1] - maps[0][:, ::-1]).max() <= 2  # 8-bit PNG levels


def test_explain_a_batch_gives_one_explanation_per_image(model) -> None:
    other = ROOT / "examples" / "images" / "Brittany_02625.jpg"
    answer = ask(model, {"images": [b64(PHOTO), b64(other)], "explain": True})
    assert len(answer["explanation"]) == 2
    assert [e["label"] for e in answer["explanation"]] == [row[0]["label"] for row in answer["predictions"]]


def test_explain_must_be_a_boolean(model) -> None:
    with pytest.raises(InferenceError) as info:
        input_fn(json.dumps({"image": b64(PHOTO), "explain": "yes"}), "application/json")
    assert info.value.status == 400 and info.value.body["error"] == "bad_explain"


def test_runtimes_without_gradients_refuse_explain(tiny_package: Callable[..., Path], tmp_path: Path) -> None:
    """TorchScript (and ONNX, the same way) answer a plain request, and a 400 that names the fix for explain."""
    root = extract_package(tiny_package(exports=("torchscript",)), tmp_path)
    scripted = load_model(root, runtime="torchscript", device="cpu")
    assert len(ask(scripted, {"image": b64(PHOTO)})["predictions"]) == 5
    with pytest.raises(InferenceError) as info:
        ask(scripted, {"image": b64(PHOTO), "explain": True})
    assert info.value.status == 400 and info.value.body["error"] == "explain_needs_eager"
    assert "--runtime eager" in info.value.body["message"]
