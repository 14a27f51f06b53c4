"""The SageMaker handlers: every content type, every refused input, and photos in awkward modes."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from ts import context as ts_context

from dogbreed.serve.codec import InferenceError, Limits, decode_request
from dogbreed.serve.handlers import input_fn, model_fn, output_fn, predict_fn, transform_fn
from dogbreed.serve.runtime import DogBreedModel

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "images"
PHOTO = EXAMPLES / "Labrador_retriever_06457.jpg"


@pytest.fixture(autouse=True)
def _one_thread(_few_threads: None) -> None:
    """One torch thread: on a shared 2-vCPU machine two OpenMP threads spin-wait and a forward takes 50x longer."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> DogBreedModel:
    return model_fn(str(tiny_model_dir))


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def answer(model: DogBreedModel, body: bytes | str, content_type: str | None, accept: str = "application/json"):
    data = input_fn(body, content_type)
    content, media_type = output_fn(predict_fn(data, model), accept)
    assert media_type == "application/json"
    return json.loads(content)["predictions"]


def refused(body: bytes | str | None, content_type: str | None, limits: Limits | None = None) -> InferenceError:
    with pytest.raises(InferenceError) as info:
        decode_request(body, content_type, limits or Limits.from_env())
    err = info.value
    assert 400 <= err.status < 500
    assert set(err.body) == {"error", "message", "accepted"}
    assert json.loads(err.message) == err.body  # what the SageMaker toolkit sends back
    return err


@pytest.fixture(scope="module")
def expected(model: DogBreedModel) -> list[dict]:
    return answer(model, PHOTO.read_bytes(), "image/jpeg")


@pytest.mark.parametrize(
    "content_type",
    ["image/jpeg", "image/png", "application/x-image", "application/octet-stream", None, "IMAGE/JPEG; q=1"],
)
def test_raw_image_content_types(model, expected, content_type) -> None:
    top = answer(model, PHOTO.read_bytes(), content_type)
    assert top == expected
    assert len(top) == 5 and {"label", "index", "probability"} == set(top[0])
    assert top[0]["probability"] >= top[-1]["probability"]
    assert model.class_names[top[0]["index"]] == top[0]["label"]


def test_json_single_and_batches(model, expected) -> None:
    b64 = base64.b64encode(PHOTO.read_bytes()).decode()
    assert answer(model, json.dumps({"image": b64}), "application/json") == expected
    assert answer(model, json.dumps({"image": f"data:image/jpeg;base64,{b64}"}), "application/json") == expected
    for batch in ({"images": [b64, b64]}, [b64, b64], [{"image": b64}, {"image": b64}]):
        rows = answer(model, json.dumps(batch).encode(), "application/json")
        assert len(rows) == 2
        for row in rows:
            assert [p["index"] for p in row] == [p["index"] for p in expected]
            assert [p["probability"] for p in row] == pytest.approx([p["probability"] for p in expected], abs=1e-4)


def test_top_k_from_body_and_accept(model, expected) -> None:
    b64 = base64.b64encode(PHOTO.read_bytes()).decode()
    assert answer(model, json.dumps({"image": b64, "top_k": 2}), "application/json") == expected[:2]
    assert answer(model, PHOTO.read_bytes(), "image/jpeg", accept="application/json; top_k=3") == expected[:3]
    assert len(answer(model, PHOTO.read_bytes(), "image/jpeg", accept="*/*;top_k=99")) == 10
    for accept in ("text/html, application/*", "*/*", ""):
        assert answer(model, PHOTO.read_bytes(), "image/jpeg", accept=accept) == expected


def test_npy_pixels_and_preprocessed_tensors(model, expected) -> None:
    rgb = np.asarray(Image.open(PHOTO).convert("RGB"))
    one = io.BytesIO()
    np.save(one, rgb)
    assert answer(model, one.getvalue(), "application/x-npy") == expected
    many = io.BytesIO()
    np.save(many, np.stack([rgb, rgb]))
    assert len(answer(model, many.getvalue(), "application/x-npy")) == 2
    grey = io.BytesIO()
    np.save(grey, rgb[..., 0])
    assert len(answer(model, grey.getvalue(), "application/x-npy")) == 5
    pixels = model.preprocess([Image.open(PHOTO).convert("RGB")]).numpy()
    tensor = io.BytesIO()
    np.save(tensor, pixels[0])
    assert answer(model, tensor.getvalue(), "application/x-npy") == expected


def small_photo() -> Image.Image:
    """The photo at 120 px: encoding variants of the full photo costs seconds on a busy CI machine."""
    rgb = Image.open(PHOTO).convert("RGB")
    rgb.thumbnail((120, 120))
    return rgb


def photo_variants() -> dict[str, Image.Image]:
    rgb = small_photo()
    rgba = rgb.convert("RGBA")
    rgba.putalpha(255)
    return {"rgb": rgb, "cmyk": rgb.convert("CMYK"), "rgba": rgba, "palette": rgb.convert("P")}


@pytest.mark.parametrize("mode", ["cmyk", "rgba", "palette"])
def test_other_colour_modes_give_the_same_answer(model, mode) -> None:
    variants = photo_variants()
    fmt = "JPEG" if mode == "cmyk" else "PNG"
    reference = answer(model, encode(variants["rgb"], "PNG"), "image/png")
    got = answer(model, encode(variants[mode], fmt), "image/png")
    assert got[0]["index"] == reference[0]["index"]
    assert got[0]["probability"] == pytest.approx(reference[0]["probability"], abs=0.05)


def test_greyscale_and_exif_rotation(model) -> None:
    rgb = small_photo()
    grey = answer(model, encode(rgb.convert("L"), "PNG"), "image/png")
    grey_as_rgb = answer(model, encode(rgb.convert("L").convert("RGB"), "PNG"), "image/png")
    assert grey == grey_as_rgb
    # A camera stores the sensor's pixels and an orientation tag; the endpoint must see the upright photo.
    sideways = rgb.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    tagged = encode(sideways, "JPEG", exif=exif.tobytes(), quality=95)
    upright = encode(rgb, "JPEG", quality=95)
    assert answer(model, tagged, "image/jpeg")[0]["index"] == answer(model, upright, "image/jpeg")[0]["index"]
    data = input_fn(tagged, "image/jpeg")
    assert data.items[0].size == rgb.size


def test_refuses_empty_and_unsupported() -> None:
    assert refused(b"", "image/jpeg").body["error"] == "empty_body"
    assert refused(None, "image/jpeg").body["error"] == "empty_body"
    err = refused(PHOTO.read_bytes(), "text/csv")
    assert err.status == 415 and "image/jpeg" in err.body["accepted"]
    assert "application/json" in err.body["message"]


def test_refuses_bad_images() -> None:
    assert refused(b"hello, I am not a photo", "image/jpeg").body["error"] == "not_an_image"
    truncated = refused(PHOTO.read_bytes()[:5000], "image/jpeg")
    assert truncated.body["error"] == "corrupt_image" and "truncated" in truncated.body["message"]


def test_refuses_decompression_bombs_and_oversized_bodies() -> None:
    bomb = encode(Image.new("L", (6000, 6000)), "PNG")  # 36 MP that compress to a few kB
    assert len(bomb) < 100_000
    err = refused(bomb, "image/png", Limits(max_pixels=1_000_000))
    assert err.status == 413 and err.body["error"] == "too_many_pixels"
    err = refused(PHOTO.read_bytes(), "image/jpeg", Limits(max_image_bytes=1000))
    assert err.status == 413 and err.body["error"] == "image_too_large"
    b64 = base64.b64encode(PHOTO.read_bytes()).decode()
    assert refused(json.dumps({"image": b64}), "application/json", Limits(max_image_bytes=1000)).status == 413
    err = refused(json.dumps([b64] * 3), "application/json", Limits(max_images=2))
    assert err.status == 413 and err.body["error"] == "too_many_images"
    huge = io.BytesIO()
    np.save(huge, np.zeros((2000, 1000, 3), np.uint8))
    assert refused(huge.getvalue(), "application/x-npy", Limits(max_pixels=1_000_000)).status == 413


def test_input_fn_takes_its_limits_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """SageMaker's toolkit calls ``input_fn(body, content_type)``; the endpoint's environment sets the limits."""
    monkeypatch.setenv("DOGBREED_MAX_IMAGE_BYTES", "1000")
    with pytest.raises(InferenceError) as info:
        input_fn(PHOTO.read_bytes(), "image/jpeg")
    assert info.value.status == 413 and info.value.body["error"] == "image_too_large"


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ('{"image": "not base64!!"}', "bad_base64"),
        ('{"image": "aGVsbG8"}', "bad_base64"),  # missing padding
        ("{not json", "bad_json"),
        ('{"picture": "aGVsbG8="}', "bad_json_shape"),
        ("42", "bad_json_shape"),
        ("[]", "empty_batch"),
        ("[42]", "bad_json_shape"),
        ('{"image": "aGVsbG8=", "top_k": 0}', "bad_top_k"),
        ('{"image": "aGVsbG8="}', "not_an_image"),
    ],
)
def test_refuses_bad_json(body: str, error: str) -> None:
    assert refused(body, "application/json").body["error"] == error


def test_refuses_bad_npy() -> None:
    assert refused(b"\x93NUMPY garbage", "application/x-npy").body["error"] == "bad_npy"
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert "unpickling" in refused(pickled.getvalue(), "application/x-npy").body["message"]
    liar = io.BytesIO()
    np.save(liar, np.zeros((4, 4, 3), np.uint8))
    header = liar.getvalue().replace(b"(4, 4, 3)", b"(9999999, 9999, 3)")  # promises 30 GB
    assert refused(header, "application/x-npy").body["error"] == "bad_npy"
    wrong = io.BytesIO()
    np.save(wrong, np.zeros((4, 4), np.int64))
    assert refused(wrong.getvalue(), "application/x-npy").body["error"] == "bad_npy"


def test_refuses_wrong_tensor_shape_and_accept(model) -> None:
    tensor = io.BytesIO()
    np.save(tensor, np.zeros((3, 64, 64), np.float32))
    with pytest.raises(InferenceError, match=r"\(3, 32, 32\)") as info:
        predict_fn(input_fn(tensor.getvalue(), "application/x-npy"), model)
    assert info.value.status == 400
    prediction = predict_fn(input_fn(PHOTO.read_bytes(), "image/jpeg"), model)
    for accept, status in (("text/csv", 406), ("application/json;top_k=zero", 400)):
        with pytest.raises(InferenceError) as info:
            output_fn(prediction, accept)
        assert info.value.status == status


def test_probabilities_sum_to_one(model) -> None:
    prediction = predict_fn(input_fn(PHOTO.read_bytes(), "image/jpeg"), model)
    assert prediction.probabilities.shape == (1, 10)
    assert torch.allclose(prediction.probabilities.sum(dim=1), torch.ones(1))


def test_request_pixels_are_counted_from_headers_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """16 PNGs of 6300x6300 are 38 kB each: refused from their headers, with not one of them decoded."""
    big = base64.b64encode(encode(Image.new("L", (6300, 6300)), "PNG")).decode()
    small = encode(Image.new("RGB", (40, 40)), "PNG")
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded an image"))
    err = refused(json.dumps([big] * 16), "application/json")
    assert err.status == 413 and err.body["error"] == "too_many_pixels_in_request"
    monkeypatch.setenv("DOGBREED_MAX_REQUEST_PIXELS", "1000")
    with pytest.raises(InferenceError) as info:  # SageMaker's input_fn reads the budget from the environment
        input_fn(small, "image/png")
    assert info.value.body["error"] == "too_many_pixels_in_request"


def test_non_finite_answers_are_refused(model) -> None:
    prediction = predict_fn(input_fn(PHOTO.read_bytes(), "image/jpeg"), model)
    prediction.probabilities[0, 0] = float("nan")
    with pytest.raises(InferenceError) as info:
        output_fn(prediction, "application/json")
    assert info.value.status == 400 and info.value.body["error"] == "non_finite_output"


def torchserve_context() -> object:
    """TorchServe's own request context for one request, as its Python worker builds it."""
    context = ts_context.Context("model", "/opt/ml/model", None, 1, None, "0.12.0")
    context.request_processor = [ts_context.RequestProcessor({})]
    return context


def test_transform_fn_answers_refusals_and_failures_in_json_alone(model, expected, monkeypatch, caplog) -> None:
    """What code/inference.py exports: 200, a refusal's own status, or a 500 whose traceback goes to the log."""
    context = torchserve_context()
    body, media_type = transform_fn(model, PHOTO.read_bytes(), "image/jpeg", "application/json", context)
    assert media_type == "application/json" and json.loads(body)["predictions"] == expected
    assert context.get_response_status(0)[0] == 200

    body, media_type = transform_fn(model, b"not a photo", "image/jpeg", "application/json", context)
    assert context.get_response_status(0) == (400, "Bad Request") and json.loads(body)["error"] == "not_an_image"

    def broken(pixels: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(model, "predict", broken)
    body, media_type = transform_fn(model, PHOTO.read_bytes(), "image/jpeg", "application/json", context)
    assert context.get_response_status(0) == (500, "Internal Server Error") and media_type == "application/json"
    assert json.loads(body) == {
        "error": "internal_error", "message": "the endpoint failed on this request; see its log."
    }  # fmt: skip
    assert "CUDA error" not in body.decode() and "illegal memory access" in caplog.text
