"""Batch prediction: the endpoint's answers for many files, labelled folders, bad files, S3, CSV and JSON lines."""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import boto3
import pytest

from dogbreed import predict
from dogbreed.serve import handlers

from .conftest import write_image_folder
from .installed import hidden_except
from .test_install import env_with

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "images"
PHOTOS = sorted(EXAMPLES.glob("*.jpg"))
CLASSES = ("001.Affenpinscher", "003.Beagle", "009.Labrador_retriever")


def endpoint_answer(model_dir: Path, photo: Path) -> list[dict]:
    """What the SageMaker handlers answer for ``photo`` sent alone as image/jpeg."""
    model = handlers.model_fn(str(model_dir))
    prediction = handlers.predict_fn(handlers.input_fn(photo.read_bytes(), "image/jpeg"), model)
    body, _ = handlers.output_fn(prediction, "application/json")
    return json.loads(body)["predictions"]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def labelled_folder(root: Path) -> Path:
    """``root/test/<NNN.Breed>/*.jpg`` for three of the tiny model's breeds, plus a corrupt and an empty file."""
    write_image_folder(root, classes=list(CLASSES), counts={"test": 4})
    (root / "test" / CLASSES[0] / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    (root / "test" / CLASSES[1] / "empty.png").write_bytes(b"")
    (root / "test" / CLASSES[1] / "notes.txt").write_text("not an image: never read")
    return root


def test_examples_answer_as_the_endpoint_does(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Every row holds the handlers' answer for that file (one code path), batched or not."""
    rows = {}
    for batch_size in (1, 2):
        out = tmp_path / f"b{batch_size}.csv"
        summary = predict.predict_to_file(tiny_model_dir, EXAMPLES, out, batch_size=batch_size, top_k=3)
        assert (summary.images, summary.errors, summary.confusion_csv) == (2, 0, None)
        rows[batch_size] = read_csv(out)
        # LICENSE.txt and README.md are not images: no rows, no errors; no true_label without class folders
        assert [Path(r["path"]) for r in rows[batch_size]] == PHOTOS
        assert list(rows[batch_size][0]) == [
            "path", "label_1", "probability_1", "label_2", "probability_2", "label_3", "probability_3", "error"
        ]  # fmt: skip
    for row_1, row_2, photo in zip(rows[1], rows[2], PHOTOS, strict=True):
        want = endpoint_answer(tiny_model_dir, photo)[:3]
        for row in (row_1, row_2):
            assert [row[f"label_{i}"] for i in (1, 2, 3)] == [p["label"] for p in want]
            got = [float(row[f"probability_{i}"]) for i in (1, 2, 3)]
            assert got == pytest.approx([p["probability"] for p in want], abs=1e-5)
            assert row["error"] == ""


def test_labelled_folder_accuracy_confusion_and_bad_files(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = labelled_folder(tmp_path / "data")
    out = tmp_path / "out" / "predictions.csv"
    predict.main([str(tiny_model_dir.parent), str(data), "-o", str(out), "--batch-size", "5"])
    printed = capsys.readouterr().out
    rows = read_csv(out)
    assert len(rows) == 14  # 12 images and the two bad files; notes.txt is skipped
    bad = {Path(r["path"]).name: r["error"] for r in rows if r["error"]}
    assert set(bad) == {"broken.jpg", "empty.png"}
    assert bad["broken.jpg"].startswith(("not_an_image:", "corrupt_image:")) and "broken.jpg" in bad["broken.jpg"]
    assert "image/jpeg" not in bad["broken.jpg"]  # the endpoint's list of content types means nothing here
    assert all(r["label_1"] == "" for r in rows if r["error"])
    good = [r for r in rows if not r["error"]]
    assert {r["true_label"] for r in rows} == {"Affenpinscher", "Beagle", "Labrador_retriever"}
    right = sum(r["label_1"] == r["true_label"] for r in good)
    assert f"accuracy {right / 12:.3f} ({right} of 12 labelled images right)" in printed
    assert "14 images, 2 errors" in printed

    matrix = read_csv(out.with_name("predictions_confusion_matrix.csv"))
    names = [name for name in matrix[0] if name != "true \\ predicted"]
    assert names == json.loads((tiny_model_dir / "classes.json").read_text())
    counts = {(m["true \\ predicted"], name): int(m[name]) for m in matrix for name in names}
    assert sum(counts.values()) == 12
    for r in good:
        counts[r["true_label"], r["label_1"]] -= 1
    assert set(counts.values()) == {0}


def test_jsonl_top_k_and_classes_the_model_lacks(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_image_folder(tmp_path / "data", classes=["002.Boxer", "117.Not_a_breed_here"], counts={"x": 2})
    out = tmp_path / "p.jsonl"
    summary = predict.predict_to_file(tiny_model_dir, data, out, top_k=2, workers=1)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["true_label"] for r in records] == ["Boxer"] * 2 + ["Not_a_breed_here"] * 2
    assert all(len(r["predictions"]) == 2 and r["error"] is None for r in records)
    assert set(records[0]["predictions"][0]) == {"label", "index", "probability"}
    # images of a class the model does not know count neither for nor against it
    assert (summary.labelled, summary.unknown_classes) == (2, ["Not_a_breed_here"])
    assert summary.accuracy == sum(r["predictions"][0]["label"] == "Boxer" for r in records[:2]) / 2


def test_model_archive_list_file_and_single_image(
    tiny_model_dir: Path, tiny_package: Callable[..., Path], tmp_path: Path
) -> None:
    archive = tiny_package(top_k=3)  # tests/test_package.py's option set
    listing = tmp_path / "list.txt"
    listing.write_text(f"# photos\n{PHOTOS[1]}\n\n{tmp_path / 'missing.jpg'}\n{PHOTOS[0]}\n")
    rows = read_csv(predict.predict_to_file(archive, listing, tmp_path / "p.csv").output)
    assert [Path(r["path"]) for r in rows] == [PHOTOS[1], tmp_path / "missing.jpg", PHOTOS[0]]
    assert rows[1]["error"].startswith("unreadable: FileNotFoundError") and rows[1]["label_1"] == ""
    assert "label_3" in rows[0] and "label_4" not in rows[0]  # the package's top_k
    assert rows[2]["label_1"] == endpoint_answer(tiny_model_dir, PHOTOS[0])[0]["label"]

    (single,) = read_csv(predict.predict_to_file(tiny_model_dir, PHOTOS[0], tmp_path / "one.csv").output)
    assert single["path"] == str(PHOTOS[0]) and single["label_1"] == rows[2]["label_1"]


def test_s3_prefix_through_moto(aws_env: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="photos")
    data = labelled_folder(tmp_path / "data")
    for path in sorted(p for p in data.rglob("*") if p.is_file()):
        s3.upload_file(str(path), "photos", f"batch/{path.relative_to(data).as_posix()}")
    s3.put_object(Bucket="photos", Key="batch-other/003.Beagle/x.jpg", Body=PHOTOS[0].read_bytes())  # not under it

    local = read_csv(predict.predict_to_file(tiny_model_dir, data, tmp_path / "local.csv").output)
    summary = predict.predict_to_file(tiny_model_dir, "s3://photos/batch", tmp_path / "s3.csv")
    remote = read_csv(summary.output)
    assert [r["path"] for r in remote] == [
        f"s3://photos/batch/{Path(r['path']).relative_to(data).as_posix()}" for r in local
    ]
    keys = ("true_label", "label_1", "probability_1")
    for there, here in zip(remote, local, strict=True):
        assert [there[k] for k in keys] == [here[k] for k in keys]
        assert bool(there["error"]) == bool(here["error"])
    assert (summary.labelled, summary.errors) == (12, 2)


def test_bad_model_or_input_is_one_line_and_exit_2(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    not_archive = tmp_path / "model.tar.gz"
    not_archive.write_text("not a tarball")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        ([str(tmp_path / "nope"), str(EXAMPLES)], "nope does not exist: pass a model.tar.gz"),
        ([str(not_archive), str(EXAMPLES)], "model.tar.gz is not a .tar.gz archive"),
        ([str(empty), str(EXAMPLES)], "holds no model.pt"),
        ([str(tiny_model_dir), str(tmp_path / "nothing")], "nothing does not exist: pass a folder of images"),
        ([str(tiny_model_dir), str(empty)], "empty holds no images"),
        ([str(tiny_model_dir), str(EXAMPLES), "-o", str(tmp_path / "p.txt")], "pass --format csv|jsonl"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exited:
            predict.main(argv)
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert exited.value.code == 2 and len(errors) == 1 and message in errors[0], err


def test_progress_bar_only_on_a_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for stream, drawn in ((io.StringIO(), False), (Terminal(), True)):
        progress = predict._Progress(3, stream)
        for _ in range(3):
            progress.update()
        assert bool(stream.getvalue()) == drawn
    assert re.search(r"\[#{30}\] 3/3 images, [\d.]+/s\n$", stream.getvalue())


def test_labels_only_numbered_class_folders() -> None:
    """A folder is a class only with dogImages' numeric prefix, named as training names it."""
    assert [predict.class_of_folder(f) for f in ("001.Affenpinscher", "12_Pug", "3-Boxer")] == [
        "Affenpinscher", "Pug", "Boxer",
    ]  # fmt: skip
    assert [predict.class_of_folder(f) for f in ("Beagle", "001Beagle", "a.001.Pug", "photos")] == [None] * 4


def test_runs_on_the_core_install_alone(tiny_model_dir: Path, tmp_path: Path) -> None:
    """No extra needed: the serving handlers it runs need only torch, torchvision, Pillow and numpy."""
    out = tmp_path / "p.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "dogbreed.predict", str(tiny_model_dir), str(EXAMPLES), "-o", str(out)],
        env=env_with(tmp_path, hidden_except()), capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith(f"Wrote {out}: 2 images, 0 errors")
    assert len(out.read_text().splitlines()) == 2
