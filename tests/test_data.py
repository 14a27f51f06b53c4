"""Data: layout checks, bad data, colour modes, staging from S3 and archives, the CLI."""

from __future__ import annotations

import http.server
import json
import shutil
import threading
import zipfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import boto3
import numpy as np
import pytest
import torch
from PIL import Image

from dogbreed.data import DataError, DogBreedDataModule, build_index, stage, staging, upload
from dogbreed.data import __main__ as data_cli
from dogbreed.rundir import DATA_REPORT
from dogbreed.transforms import load_rgb


def datamodule(source: Path, tmp_path: Path, **kwargs) -> DogBreedDataModule:
    defaults = dict(cache_dir=tmp_path / "cache", batch_size=4, num_workers=0, image_size=32, resize_size=36)
    return DogBreedDataModule(source, **{**defaults, **kwargs})


def test_loaders_yield_normalised_batches_and_display_names(image_folder, tmp_path):
    dm = datamodule(image_folder(), tmp_path)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.num_classes == 3
    assert dm.class_names == ["Alpha", "Beta", "Gamma"]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and set(y.tolist()) <= {0, 1, 2}
    assert {len(dm.datasets[s]) for s in ("valid", "test")} == {9}


def test_val_is_accepted_for_valid(image_folder, tmp_path):
    root = image_folder()
    (root / "valid").rename(root / "val")
    dm = datamodule(root, tmp_path)
    dm.setup("fit")
    assert len(dm.datasets["valid"]) == 9


def test_missing_split_names_it_and_the_layout(image_folder, tmp_path):
    root = image_folder()
    shutil.rmtree(root / "test")
    with pytest.raises(DataError, match=r"missing the split folder\(s\) \['test'\].*\{train,valid,test\}"):
        datamodule(root, tmp_path).prepare_data()


def test_differing_class_folders_are_listed(image_folder, tmp_path):
    root = image_folder()
    (root / "valid" / "002.Beta").rename(root / "valid" / "002.Betta")
    with pytest.raises(DataError) as err:
        datamodule(root, tmp_path).prepare_data()
    assert "valid: missing ['002.Beta']; not in train ['002.Betta']" in str(err.value)


def test_empty_class_is_named(image_folder, tmp_path):
    root = image_folder()
    for f in (root / "test" / "003.Gamma").iterdir():
        f.unlink()
    with pytest.raises(DataError, match=r"empty class folder\(s\).*test/003.Gamma"):
        datamodule(root, tmp_path).prepare_data()


def test_no_images_at_all(tmp_path):
    for split in ("train", "valid", "test"):
        (tmp_path / "data" / split / "001.A").mkdir(parents=True)
    with pytest.raises(DataError, match="no files at all"):
        datamodule(tmp_path / "data", tmp_path).prepare_data()


def test_num_classes_mismatch_says_how_to_fix(image_folder, tmp_path):
    with pytest.raises(DataError, match=r"data.num_classes=133 but .* has 3 class folders: set data.num_classes=3"):
        datamodule(image_folder(), tmp_path, num_classes=133).prepare_data()


def test_corrupt_truncated_and_non_image_files_are_excluded_and_reported(image_folder, tmp_path):
    root = image_folder()
    good = root / "train" / "001.Alpha" / "001.Alpha_000.jpg"
    (root / "train" / "001.Alpha" / "truncated.jpg").write_bytes(good.read_bytes()[:200])
    (root / "train" / "002.Beta" / "garbage.jpg").write_bytes(b"not a jpeg at all")
    (root / "valid" / "003.Gamma" / "notes.txt").write_text("hello")
    dm = datamodule(root, tmp_path)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 18  # the 3 bad files are not among them
    report = json.loads((staging.state_dir(root, tmp_path / "cache") / DATA_REPORT).read_text())
    excluded = {item["file"]: item["reason"] for item in report["excluded"]}
    assert set(excluded) == {
        "train/001.Alpha/truncated.jpg",
        "train/002.Beta/garbage.jpg",
        "valid/003.Gamma/notes.txt",
    }
    assert "not an image file" in excluded["valid/003.Gamma/notes.txt"]
    assert "cannot be decoded" in excluded["train/001.Alpha/truncated.jpg"]
    batches = list(dm.train_dataloader())  # training goes on over the good files
    assert sum(len(y) for _, y in batches) == 16  # drop_last with batch 4


def test_symlinks_outside_the_dataset_and_dangling_ones_are_reported(image_folder, tmp_path, caplog):
    """A link leading outside the dataset is excluded unless data.follow_symlinks; a dangling one is listed too."""
    root = image_folder()
    outside = image_folder("elsewhere")
    alpha = root / "train" / "001.Alpha"
    (alpha / "outside.jpg").symlink_to(outside / "train" / "001.Alpha" / "001.Alpha_000.jpg")
    (alpha / "inside.jpg").symlink_to(alpha / "001.Alpha_001.jpg")
    (alpha / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    with caplog.at_level("WARNING", logger="dogbreed.data.layout"):
        dm = datamodule(root, tmp_path)
        dm.setup("fit")
    assert len(dm.datasets["train"]) == 19  # 18 files + the link inside the dataset
    excluded = {e["file"]: e["reason"] for e in dm.index.excluded}
    assert set(excluded) == {"train/001.Alpha/outside.jpg", "train/001.Alpha/dangling.jpg"}
    assert "data.follow_symlinks=true" in excluded["train/001.Alpha/outside.jpg"]
    assert "dangling symlink" in excluded["train/001.Alpha/dangling.jpg"]
    # the console names the files and why, not just a count
    assert "train/001.Alpha/dangling.jpg: dangling symlink" in caplog.text
    report = dm.write_report(tmp_path / "run")
    assert json.loads(report.read_text())["excluded"] == dm.index.excluded

    follow = datamodule(root, tmp_path, follow_symlinks=True)
    follow.setup("fit")
    assert len(follow.datasets["train"]) == 20
    assert [e["file"] for e in follow.index.excluded] == ["train/001.Alpha/dangling.jpg"]


def test_index_is_cached_until_files_change(image_folder, tmp_path, monkeypatch):
    root = image_folder()
    index_dir = tmp_path / "idx"
    build_index(root, index_dir=index_dir)
    calls = []
    monkeypatch.setattr("dogbreed.data.layout._check_image", lambda p: calls.append(p))
    build_index(root, index_dir=index_dir)
    assert calls == []  # second run decodes nothing
    Image.new("RGB", (20, 20)).save(root / "train" / "001.Alpha" / "new.png")
    build_index(root, index_dir=index_dir)
    assert len(calls) > 0


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "1"])
def test_every_colour_mode_becomes_rgb(tmp_path, mode):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (10, 12, 3), dtype=np.uint8))
    image = rgb.convert("RGBA").convert(mode) if mode != "I;16" else rgb.convert("L").convert("I;16")
    fmt = "JPEG" if mode == "CMYK" else "TIFF" if mode == "I;16" else "PNG"
    path = tmp_path / f"x.{fmt.lower()}"
    image.save(path, fmt)
    out = load_rgb(path)
    assert out.mode == "RGB" and out.size == (12, 10)


def test_transparent_pixels_become_white_not_black(tmp_path):
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert load_rgb(tmp_path / "clear.png").getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.save(tmp_path / "palette.png", transparency=0)
    assert load_rgb(tmp_path / "palette.png").getpixel((0, 0)) == (255, 255, 255)


# --- S3 staging against a real S3 API server ---------------------------------------------------------


@pytest.fixture
def bucket(aws_env) -> str:
    name = f"data-{np.random.default_rng().integers(1e9)}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


def test_upload_then_stage_from_s3_and_rerun_transfers_nothing(image_folder, tmp_path, bucket, monkeypatch):
    root = image_folder()
    assert upload(root, f"s3://{bucket}/dogImages") == 36
    uri = f"s3://{bucket}/dogImages"
    staged = stage(uri, tmp_path / "cache")
    assert sorted(p.relative_to(staged) for p in staged.rglob("*.jpg")) == sorted(
        p.relative_to(root) for p in root.rglob("*.jpg")
    )
    manifest = json.loads((staging.state_dir(uri, tmp_path / "cache") / "manifest.json").read_text())
    entry = manifest["files"]["train/001.Alpha/001.Alpha_000.jpg"]
    assert entry["size"] == (root / "train/001.Alpha/001.Alpha_000.jpg").stat().st_size
    assert len(entry["sha256"]) == 64

    downloads = []
    real_client = staging.s3_client

    def counting_client(endpoint_url=None, **kwargs):
        client = real_client(endpoint_url, **kwargs)
        client.meta.events.register(
            "provide-client-params.s3.GetObject", lambda params, **_: downloads.append(params["Key"])
        )
        return client

    monkeypatch.setattr(staging, "s3_client", counting_client)
    assert stage(uri, tmp_path / "cache") == staged
    assert downloads == []

    # an interrupted transfer: one file missing, a stray partial file, no complete manifest
    victim = staged / "valid/002.Beta/002.Beta_001.jpg"
    victim.unlink()
    (victim.parent / f".{victim.name}.part").write_bytes(b"half")
    stage(uri, tmp_path / "cache")
    assert downloads == ["dogImages/valid/002.Beta/002.Beta_001.jpg"]
    assert victim.read_bytes() == (root / "valid/002.Beta/002.Beta_001.jpg").read_bytes()


def test_datamodule_endpoint_setting_wins_over_environment(image_folder, tmp_path, bucket, moto_server, monkeypatch):
    upload(image_folder(), f"s3://{bucket}/d")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # wrong on purpose: data.endpoint_url wins
    dm = datamodule(f"s3://{bucket}/d", tmp_path, endpoint_url=moto_server)
    dm.setup("fit")
    assert dm.num_classes == 3


def test_empty_s3_prefix_says_how_to_upload(bucket, tmp_path):
    with pytest.raises(DataError, match=r"python -m dogbreed\.data upload"):
        stage(f"s3://{bucket}/nothing", tmp_path / "cache")


# --- archives ---------------------------------------------------------------------------------------


@pytest.fixture
def http_dir(tmp_path) -> Iterator[tuple[Path, str]]:
    """Serve a folder over HTTP on 127.0.0.1 (stands in for the https archive host)."""
    served = tmp_path / "www"
    served.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_zip_archive_is_staged_once_under_its_top_folder(image_folder, tmp_path, http_dir):
    served, url = http_dir
    root = image_folder("dogImages")
    with zipfile.ZipFile(served / "dogImages.zip", "w") as zf:
        for path in root.rglob("*.jpg"):
            zf.write(path, Path("dogImages") / path.relative_to(root))
    staged = stage(f"{url}/dogImages.zip", tmp_path / "cache")
    assert staged.name == "dogImages" and (staged / "train" / "001.Alpha").is_dir()
    (served / "dogImages.zip").unlink()  # a second run must not need the server
    assert stage(f"{url}/dogImages.zip", tmp_path / "cache") == staged


@pytest.mark.parametrize("evil", ["../escape.txt", "/etc/evil.txt", "a/../../escape.txt"])
def test_zip_slip_is_rejected(tmp_path, evil):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("train/ok.txt", "fine")
        zf.writestr(evil, "bad")
    with pytest.raises(DataError, match="refusing unsafe path"):
        staging.extract_zip(archive, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()


def test_unreachable_archive_fails_with_offline_advice(tmp_path):
    with pytest.raises(DataError, match=r"could not download .* set data\.source to the folder"):
        stage("http://127.0.0.1:9/dogImages.zip", tmp_path / "cache")


# --- CLI ----------------------------------------------------------------------------------------------


def test_check_cli_prints_counts_imbalance_and_problems(image_folder, tmp_path, capsys):
    root = image_folder(counts={"train": 8, "valid": 2, "test": 2})
    (root / "train" / "001.Alpha" / "broken.jpg").write_bytes(b"\xff\xd8\xff")
    for f in sorted((root / "train" / "003.Gamma").iterdir())[:6]:
        f.unlink()
    assert data_cli.main(["check", str(root), "--cache-dir", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert "3 classes" in out
    assert "Alpha" in out and "total" in out
    assert "class imbalance (largest/smallest train class): 4.00" in out
    assert "train/001.Alpha/broken.jpg: cannot be decoded" in out


def test_check_cli_reports_bad_layout_without_traceback(tmp_path, capsys):
    assert data_cli.main(["check", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
