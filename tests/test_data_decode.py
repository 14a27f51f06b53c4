"""``dogbreed.data.decode``: decode_jpeg gives PIL's pixels, falls back to PIL; batched decoding knows its limits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dogbreed.data.cache import (
    estimate_bytes,
)
from dogbreed.data.decode import (
    DecodedImageDataset,
    decode_jpegs_resized,
    decodes_on_device,
    read_rgb,
)
from dogbreed.transforms import Preprocessing, load_rgb

from .conftest import add_odd_jpegs, smooth_image


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_decode_jpeg_gives_the_same_rgb_pixels_as_pil(tmp_path, mode):
    path = tmp_path / "a.jpg"
    smooth_image(50, 37).convert(mode).save(path, quality=90)
    image = read_rgb(path, "torchvision")
    assert image.dtype == torch.uint8 and image.shape == (3, 37, 50)
    assert torch.equal(image, read_rgb(path, "pil"))


def test_decode_applies_exif_rotation_like_pil(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    path = tmp_path / "rotated.jpg"
    smooth_image(40, 30).save(path, exif=exif.tobytes(), quality=90)
    assert read_rgb(path).shape == (3, 40, 30)
    assert torch.equal(read_rgb(path), read_rgb(path, "pil"))
    assert estimate_bytes(tmp_path, ["rotated.jpg"], 20) == 3 * 26 * 20  # short side 30 -> 20, long 40 -> 26


def test_other_formats_fall_back_to_pil(tmp_path):
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[..., 0] = 200  # red, fully transparent: composited over white like load_rgb does
    Image.fromarray(rgba).save(tmp_path / "a.png")
    expected = torch.from_numpy(np.array(load_rgb(tmp_path / "a.png"))).permute(2, 0, 1)
    assert torch.equal(read_rgb(tmp_path / "a.png"), expected)
    assert int(expected.min()) == 255


def test_unreadable_file_is_named_in_the_error(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(ValueError, match=r"bad\.jpg cannot be decoded"):
        DecodedImageDataset(tmp_path, [("bad.jpg", 0)], None)[0]


def test_decodes_on_device_turns_away_what_a_batched_decode_gets_wrong(varied, tmp_path):
    add_odd_jpegs(varied)
    folder = varied / "train" / "001.Class0"
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    eligible = {
        folder / "img0.jpg": True,
        folder / "img_grey.jpg": True,
        folder / "img_png.png": False,
        folder / "img_cmyk.jpg": False,
        folder / "img_rotated.jpg": False,
        tmp_path / "bad.jpg": False,
    }
    assert {path: decodes_on_device(path.read_bytes()) for path in eligible} == eligible


def test_batched_decode_on_the_cpu_equals_the_per_image_decode(varied):
    """The batched function a GPU build calls, run on the CPU: libjpeg-turbo, the same pixels as read_rgb."""
    resize = Preprocessing(image_size=16, resize_size=20).resize_transform()
    paths = sorted(p for p in varied.rglob("*.jpg") if decodes_on_device(p.read_bytes()))[:6]
    encoded = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in paths]
    images = decode_jpegs_resized(encoded, resize, "cpu")
    assert len(images) == len(paths)
    for path, image in zip(paths, images, strict=True):
        assert image.device.type == "cpu" and torch.equal(image, resize(read_rgb(path))), path
