"""Shared fixtures: the real composed config (forced small and CPU), image folders, an S3 server."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import DictConfig, open_dict
from PIL import Image

from dogbreed.config import compose_config as compose
from dogbreed.data import DogBreedDataModule
from dogbreed.data.cache import shard_name

from .installed import IsolatedPython, build_wheel, copy_clone

SHARED = Path(__file__).resolve().parents[1].parent / "shared"  # large files kept outside the repository
TINY_BREEDS = ["Affenpinscher", "Afghan_hound", "Beagle", "Boxer", "Brittany", "Bulldog", "Collie", "Dalmatian",
               "Labrador_retriever", "Pug"]  # the classes of tiny_model_dir  # fmt: skip


# Session setups that take seconds to a minute on the 2-core CI machine: a test that needs one is slow, marked
# here so that ``pytest -m "not slow"`` never builds them (docs/contributing.md); the rest are marked one by one.
SLOW_FIXTURES = {
    "debug_demo_run": "trains the demo for 3 epochs with the debugger, profiler and report",
    "clone_copy": "copies the checkout's files for a wheel or an image build",
    "bare_python": "a virtualenv with SageMaker's toolkits and TorchServe",
    "mlflow_server": "starts an MLflow tracking server",
    "postgres_url": "initialises and starts a PostgreSQL server",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES.keys() & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """Compose ``conf/train.yaml`` exactly as the CLI does, without Hydra's runtime."""
    return compose("train", overrides or [])


def make_small(cfg: DictConfig, tmp_path: Path) -> DictConfig:
    """Point a config at ``tmp_path`` and shrink it to seconds on a CPU."""
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.paths.cache_dir = str(tmp_path / "cache")
        cfg.paths.model_dir = str(tmp_path / "run" / "model")
        cfg.trainer.accelerator = "cpu"
        cfg.trainer.devices = 1
        cfg.trainer.max_epochs = 1
        cfg.trainer.limit_train_batches = 4
        cfg.trainer.limit_val_batches = 2
        cfg.trainer.limit_test_batches = 2
        cfg.trainer.num_sanity_val_steps = 0
        cfg.trainer.enable_progress_bar = False
        cfg.data.num_workers = 0
        cfg.data.cache = False  # a few batches gain nothing from decoding every image into the cache first
        cfg.callbacks.pop("progress_bar", None)
        cfg.report = False  # plotting costs seconds per run; tests/test_report.py builds it on debug_demo_run
    return cfg


@pytest.fixture(scope="session")
def mobilenet_weights() -> Path:
    """ImageNet MobileNetV2 backbone weights from ``../shared/weights/`` (tests never download); skips without them."""
    path = SHARED / "weights" / "mobilenet_v2_imagenet_backbone.pth"
    if not path.is_file():
        pytest.skip(
            f"{path} is absent: these tests read a real pretrained MobileNetV2 backbone state dict from outside the "
            "repository; put mobilenet_v2_imagenet_backbone.pth there to run them."
        )
    return path


@pytest.fixture(scope="session")
def demo_cfg_global() -> DictConfig:
    return compose_config(["experiment=demo"])


@pytest.fixture
def demo_cfg(demo_cfg_global: DictConfig, tmp_path: Path) -> DictConfig:
    """The demo experiment, small, writing under ``tmp_path``."""
    return make_small(demo_cfg_global.copy(), tmp_path)


@pytest.fixture(scope="session")
def debug_demo_run(demo_cfg_global: DictConfig, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One healthy demo run with the debugger, profiler and report, shared by their tests; returns the run dir.

    3 epochs x 16 steps of 28-px images. The demo's own ``data.mean/std`` (0.5) do not centre its images
    (``check_input_images`` says so); here they are the data's statistics.
    """
    from dogbreed.train import train

    cfg = make_small(demo_cfg_global.copy(), tmp_path_factory.mktemp("debug_demo"))
    with open_dict(cfg):
        # healthy data loading: with num_workers=0, loading is a real share of a 28-px step on a quiet 2-core
        # machine and the Dataloader rule rightly fires; one persistent worker prefetches while the model trains
        cfg.data.update(image_size=28, resize_size=32, mean=[0.34] * 3, std=[0.35] * 3)
        cfg.data.update(cache=True, num_workers=1, persistent_workers=True)
        cfg.trainer.update(max_epochs=3, limit_train_batches=16)
        cfg.callbacks.debugger.save_interval = 16
        cfg.report = True
    train(cfg)
    return Path(cfg.paths.output_dir)


def write_image_folder(
    root: Path,
    classes: list[str] = ("001.Alpha", "002.Beta", "003.Gamma"),  # type: ignore[assignment]
    counts: dict[str, int] | None = None,
    size: tuple[int, int] = (40, 32),
    fmt: str = "JPEG",
    seed: int = 0,
) -> Path:
    """Write a dogImages-layout folder of random images whose colour depends on the class."""
    rng = np.random.default_rng(seed)
    counts = counts or {"train": 6, "valid": 3, "test": 3}
    for split, n in counts.items():
        for label, cls in enumerate(classes):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = np.zeros((size[1], size[0], 3), np.uint8)
                base[..., label % 3] = 160
                noise = rng.integers(0, 60, size=base.shape, dtype=np.uint8)
                ext = "jpg" if fmt == "JPEG" else fmt.lower()
                Image.fromarray(base + noise).save(folder / f"{cls}_{i:03d}.{ext}", fmt)
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``image_folder(name="data", **write_image_folder kwargs)``."""

    def make(name: str = "data", **kwargs) -> Path:
        return write_image_folder(tmp_path / name, **kwargs)

    return make


# --- varied JPEG folders: the fast data path's tests (decode, cache, device augmentation) --------------

DATA = shard_name(0)  # the one pixel file of a cache built without worker processes


def scores(run: Path) -> dict[str, Any]:
    """The ``test/*`` metrics a run wrote to its ``metrics.json``."""
    return {k: v for k, v in json.loads((run / "metrics.json").read_text()).items() if k.startswith("test/")}


# small settings so that every data test runs in well under a second
SMALL = {"image_size": 24, "resize_size": 28, "crop_scale": (0.3, 1.0), "verify_images": False, "num_workers": 0}


def smooth_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    blobs = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(blobs).resize((width, height), Image.BICUBIC)


def write_varied_folder(root: Path) -> Path:
    """Three classes of JPEGs of different sizes and orientations, plus a PNG and a greyscale JPEG."""
    sizes = [(40, 32), (33, 50), (64, 48), (30, 30)]
    for split in ("train", "valid", "test"):
        for c in range(3):
            folder = root / split / f"{c + 1:03d}.Class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i, (w, h) in enumerate(sizes):
                smooth_image(w, h, seed=100 * c + i).save(folder / f"img{i}.jpg", quality=90)
            smooth_image(36, 44, seed=c).save(folder / "img_png.png")
            smooth_image(44, 36, seed=c).convert("L").save(folder / "img_grey.jpg", quality=90)
    return root


@pytest.fixture
def varied(tmp_path: Path) -> Path:
    return write_varied_folder(tmp_path / "data")


def add_odd_jpegs(root: Path) -> None:
    """A CMYK and an EXIF-rotated JPEG: a batched device decode would get both wrong, so the CPU decodes them."""
    folder = root / "train" / "001.Class0"
    smooth_image(40, 30, seed=5).convert("CMYK").save(folder / "img_cmyk.jpg", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    smooth_image(40, 30, seed=6).save(folder / "img_rotated.jpg", exif=exif.tobytes(), quality=90)


def datamodule(root: Path, tmp_path: Path, **kwargs) -> DogBreedDataModule:
    dm = DogBreedDataModule(root, cache_dir=tmp_path / "cache", **{**SMALL, **kwargs})
    dm.setup()
    return dm


def cache_folder(dm: DogBreedDataModule) -> Path:
    return dm.datasets["train"].cache.folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(
    url: str, process: subprocess.Popen, *, timeout: float, log: Path | None = None, interval: float = 0.2
) -> None:
    """Poll ``url`` until it answers 200; raise, with the tail of ``log``, if ``process`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            why = f"exited with {process.returncode}" if process.poll() is not None else f"not up after {timeout:g} s"
            raise RuntimeError(f"{url}: {why}\n{log.read_text()[-5000:] if log else ''}")
        time.sleep(interval)


def ask_about_photo(url: str, photo: Path) -> list[dict]:
    """POST ``photo`` to ``url/invocations`` as image/jpeg; return the predictions."""
    request = urllib.request.Request(
        f"{url}/invocations", data=photo.read_bytes(), headers={"Content-Type": "image/jpeg"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["predictions"]


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """A real AWS-API server (moto) on 127.0.0.1 in its own process; yields its endpoint URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/moto-api/", proc, timeout=30)
    except RuntimeError:
        proc.kill()
        raise
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MLflow tracking server on 127.0.0.1 (SQLite backend store, local artefact store); yields its URL."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = root / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
            cwd=root, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/health", proc, timeout=120, log=log, interval=0.5)
        yield url
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A real PostgreSQL server (Debian's ``postgresql``) in a temp data dir on 127.0.0.1; yields its SQLAlchemy URL.

    PostgreSQL refuses to run as root, so under root (CI) it runs as the ``postgres`` user the package creates.
    """
    initdb = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not initdb:
        pytest.skip("needs PostgreSQL's server: apt-get install postgresql (.ci/run installs it)")
    bindir = initdb[-1].parent
    root = Path(tempfile.mkdtemp(prefix="dogbreed-postgres-"))  # not under pytest's root-only temp dirs
    as_user: list[str] = []
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", free_port()
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True, timeout=120)  # fmt: skip
    pg_ctl = [*as_user, str(bindir / "pg_ctl"), "-D", str(data)]
    subprocess.run([*pg_ctl, "-l", str(root / "server.log"), "-w", "-o", f"-h 127.0.0.1 -p {port} -k {root}", "start"],
                   check=True, capture_output=True, timeout=120)  # fmt: skip
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "-w", "stop"], capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def aws_env(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Dummy credentials and ``AWS_ENDPOINT_URL`` pointing boto3 at the moto server."""
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": moto_server,
    }.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return moto_server


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    """Keep tests from oversubscribing the CI machine's cores."""
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``model/`` dir as training writes it: random ResNet-18, 10 breeds, 32 px inputs (built in a second)."""
    from dogbreed.artifacts import write_model_dir
    from dogbreed.models.backbone import create_backbone
    from dogbreed.transforms import Preprocessing

    torch.manual_seed(0)
    net, head = create_backbone("resnet18", num_classes=10)
    torch.nn.init.normal_(net.get_submodule(head).weight, std=0.5)  # distinct logits: stable top-k order
    return write_model_dir(
        tmp_path_factory.mktemp("tiny") / "model", net, backbone="resnet18", class_names=TINY_BREEDS,
        preprocessing=Preprocessing(image_size=32, resize_size=36),
    )  # fmt: skip


@pytest.fixture(scope="session")
def tiny_package(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: ``tiny_package(exports=(...), top_k=N)`` is ``model.tar.gz`` of ``tiny_model_dir``, built once per
    distinct option set in a test session (one to four seconds each) and shared.

    The archive is read-only to every test: extract it into ``tmp_path`` (``extract_package``) to change anything.
    """
    from dogbreed.serve.package import DEFAULT_TOP_K, build_package

    built: dict[tuple[tuple[str, ...], int], Path] = {}

    def package(*, exports: tuple[str, ...] = (), top_k: int = DEFAULT_TOP_K) -> Path:
        key = (tuple(exports), top_k)
        if key not in built:
            archive = tmp_path_factory.mktemp("tiny_package") / "model.tar.gz"
            built[key] = build_package(tiny_model_dir, archive, exports=exports, top_k=top_k)
            built[key].chmod(0o444)
        return built[key]

    return package


# --- what users install, where the checkout cannot be imported (tests/installed.py) ---------------------


@pytest.fixture(scope="session")
def clone_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The files a clone of this checkout holds, copied outside it: what ``pip install .`` and the image build see."""
    return copy_clone(tmp_path_factory.mktemp("clone") / "dogbreed")


@pytest.fixture(scope="session")
def wheel(clone_copy: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """dogbreed's wheel, built once per test session."""
    return build_wheel(clone_copy, tmp_path_factory.mktemp("wheels"))


@pytest.fixture(scope="session")
def installed_python(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> IsolatedPython:
    """``pip install dogbreed-*.whl`` in an environment where the checkout cannot be imported."""
    isolated = IsolatedPython.create(tmp_path_factory.mktemp("installed") / "venv")
    isolated.pip_install(str(wheel))
    return isolated


@pytest.fixture(scope="session")
def bare_python(tmp_path_factory: pytest.TempPathFactory) -> IsolatedPython:
    """SageMaker's stock PyTorch containers: torch, the toolkits, TorchServe; no dogbreed at all."""
    isolated = IsolatedPython.create(tmp_path_factory.mktemp("bare") / "venv")
    isolated.expose("torchserve", "train", "torchrun")  # the toolkit starts torchrun for multi-host jobs
    return isolated
