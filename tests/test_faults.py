"""Faults a job meets, each injected for real: a spot interruption of a SageMaker job, a kill in the middle of
writing a checkpoint, a damaged checkpoint to resume from, a disk that fills up under training, the decoded-image
cache and staging."""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import torch

from dogbreed._io import DiskFullError, read_jsonl, sha256_file, write_text
from dogbreed.callbacks import checkpoint_damage
from dogbreed.data import DataError, DogBreedDataModule, staging
from dogbreed.data import cache as cache_module
from dogbreed.data.cache import CachedImageDataset
from dogbreed.sagemaker.entry import container_overrides, failure_reason
from dogbreed.sagemaker.hyperparameters import overrides_to_hyperparameters
from dogbreed.train import CheckpointError, disk_full_message, resolve_ckpt_path

from .conftest import SMALL, scores, write_image_folder, write_varied_folder
from .installed import IsolatedPython
from .sagemaker_job import lay_out_job, pack_source_dir, toolkit_env

EPOCHS, BATCHES = 2, 6  # the faults strike in epoch 1, after epoch 0's checkpoints are on disk
TINY_RUN = [
    "experiment=demo", "data.image_size=28", "data.resize_size=32", "data.num_workers=1",
    f"trainer.max_epochs={EPOCHS}",
    f"+trainer.limit_train_batches={BATCHES}", "+trainer.limit_val_batches=2", "+trainer.limit_test_batches=2",
    "~callbacks.progress_bar", "report=false", "callbacks.debugger.flush_every=1",  # every loss on disk at once
]  # fmt: skip
# runs ``python -m dogbreed.train`` with SIGXFSZ's default action, so that going past RLIMIT_FSIZE kills the
# process inside the write (Python ignores the signal, which turns the kill into an EFBIG exception)
KILLABLE_BY_FILE_SIZE = (
    "import runpy, signal; signal.signal(signal.SIGXFSZ, signal.SIG_DFL); "
    "runpy.run_module('dogbreed.train', run_name='__main__', alter_sys=True)"
)


# --- fixtures and helpers ----------------------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Factory: a size-limited tmpfs (``tmpfs("64m")``) mounted under ``tmp_path``; skips where mounting is refused."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs to fill up (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def resize_tmpfs(folder: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(folder)], check=True)


def fill(folder: Path, leave: int) -> Path:
    """Take all but ``leave`` bytes of the file system holding ``folder`` with one file; return it."""
    filler = folder / "filler"
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, shutil.disk_usage(folder).free - leave)
    return filler


def cli(args: list[str], log: Path, cwd: Path, *, killable: bool = False) -> subprocess.Popen:
    command = ["-c", KILLABLE_BY_FILE_SIZE] if killable else ["-m", "dogbreed.train"]
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, *command, *args], cwd=cwd, stdout=out, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path) -> None:
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]


def wait_for_step(proc: subprocess.Popen, run: Path, step: int) -> None:
    """Until the run's recorded losses reach training step ``step``."""
    deadline = time.monotonic() + 300
    while (
        max((r["step"] for r in read_jsonl(run / "debug-output" / "losses.jsonl") if r["mode"] == "train"), default=-1)
        < step
    ):
        assert proc.poll() is None, f"the run ended before step {step}"
        assert time.monotonic() < deadline, f"the run did not reach step {step}"
        time.sleep(0.02)


def wait_for_epoch_1(proc: subprocess.Popen, run: Path) -> None:
    """Until training is a step into epoch 1 (epoch 0's checkpoints written)."""
    wait_for_step(proc, run, BATCHES + 1)


def assert_checkpoints_whole(run: Path, epoch: int) -> None:
    """Every checkpoint in the run loads, and ``last.ckpt`` holds the end of ``epoch``."""
    ckpts = sorted((run / "checkpoints").glob("*.ckpt"))
    assert ckpts and {p.name: checkpoint_damage(p) for p in ckpts} == {p.name: None for p in ckpts}
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["epoch"] == epoch


def copy_run(src: Path, dst: Path) -> Path:
    """A copy of a run dir whose saved overrides point at the copy (``resume=`` then continues the copy)."""
    shutil.copytree(src, dst)
    for saved in (dst / ".hydra").glob("*.yaml"):
        saved.write_text(saved.read_text().replace(str(src), str(dst)))
    return dst


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A tiny run never interrupted, and the overrides (its shared decoded-image cache included) that made it."""
    root = tmp_path_factory.mktemp("reference")
    common = [*TINY_RUN, f"paths.cache_dir={root / 'cache'}"]
    finish(cli([*common, f"hydra.run.dir={root / 'run'}"], root / "run.log", root), root / "run.log")
    return root / "run", common


# --- a spot interruption of a SageMaker job ---------------------------------------------------------------

SPOT_EPOCHS, SPOT_BATCHES = 3, 6
SPOT_JOB = [
    "experiment=demo", f"trainer.max_epochs={SPOT_EPOCHS}", f"+trainer.limit_train_batches={SPOT_BATCHES}",
    "+trainer.limit_val_batches=2", "+trainer.limit_test_batches=2", "data.num_workers=0", "data.cache=false",
    "data.image_size=32", "data.resize_size=36", "report=false", "callbacks.debugger.flush_every=1",
]  # fmt: skip


def start_spot_job(root: Path, python: IsolatedPython, sourcedir: Path) -> tuple[Path, subprocess.Popen]:
    """Start SageMaker's training toolkit on ``root/opt/ml`` (``tests/sagemaker_job.py``'s container) as a spot job's
    container does, its checkpoint dir synced with ``checkpoint_s3_uri`` and kept between attempts, in a session of
    its own; return base dir, process."""
    base = root / "opt" / "ml"
    if not base.is_dir():  # a restarted attempt gets the same input and its checkpoints back
        lay_out_job(base, overrides_to_hyperparameters(SPOT_JOB), sourcedir, job_name="dogbreed-spot", checkpoints=True)
    scratch = root / "tmp"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    attempt = len(list(root.glob("attempt-*.log")))
    with open(root / f"attempt-{attempt}.log", "wb") as out:
        proc = subprocess.Popen(
            [str(python.bin / "train")], env=toolkit_env(python, base, scratch), cwd=root, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    return base, proc


@pytest.fixture
def sourcedir(tmp_path: Path) -> Path:
    return pack_source_dir(tmp_path / "sourcedir.tar.gz")


@pytest.mark.slow
def test_a_spot_job_killed_mid_epoch_and_restarted_ends_as_if_never_interrupted(
    tmp_path: Path, bare_python: IsolatedPython, sourcedir: Path
):
    whole_base, whole = start_spot_job(tmp_path / "whole", bare_python, sourcedir)
    assert whole.wait(timeout=600) == 0, (tmp_path / "whole" / "attempt-0.log").read_text()[-5000:]

    root = tmp_path / "spot"
    base, proc = start_spot_job(root, bare_python, sourcedir)
    kill_step = 2 * SPOT_BATCHES + 2  # mid-epoch 2: checkpoints/last.ckpt holds epoch 1
    try:
        wait_for_step(proc, base / "output" / "data", kill_step)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the instance is reclaimed: every process of the container
        proc.wait(timeout=60)
    resumed_from = torch.load(base / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert resumed_from["epoch"] == 1 and not (base / "output" / "success").exists()
    for fresh in ("output", "model", "code"):  # SageMaker restarts the job in a new container
        shutil.rmtree(base / fresh, ignore_errors=True)

    base, proc = start_spot_job(root, bare_python, sourcedir)
    assert proc.wait(timeout=600) == 0, (root / "attempt-1.log").read_text()[-5000:]
    log = (root / "attempt-1.log").read_text()
    assert f"ckpt_path={base / 'checkpoints' / 'last.ckpt'}" in log and (base / "output" / "success").is_file()

    output, expected = base / "output" / "data", whole_base / "output" / "data"
    assert scores(output) == scores(expected)
    assert json.loads((output / "metrics.json").read_text())["epochs"] == SPOT_EPOCHS
    assert sorted(p.name for p in (base / "model").iterdir()) == sorted(
        p.name for p in (whole_base / "model").iterdir()
    )
    # the new container's records go on from the checkpoint, each step once
    first = resumed_from["global_step"]
    losses = read_jsonl(output / "debug-output" / "losses.jsonl")
    assert [r["step"] for r in losses if r["mode"] == "train"] == list(range(first, SPOT_EPOCHS * SPOT_BATCHES))
    assert not [k for k, n in Counter((r["step"], r["mode"]) for r in losses).items() if n > 1]
    tensors = read_jsonl(output / "debug-output" / "tensors.jsonl")
    assert not [k for k, n in Counter((r["step"], r["mode"], r.get("name")) for r in tensors).items() if n > 1]
    steps = [r["step"] for r in read_jsonl(output / "profiler-output" / "steps.jsonl")]
    assert steps == list(range(first, SPOT_EPOCHS * SPOT_BATCHES))


# --- a crash in the middle of writing a checkpoint --------------------------------------------------------


@pytest.mark.slow
def test_a_kill_inside_a_checkpoint_write_leaves_the_old_checkpoints_whole_and_the_resume_exact(tmp_path, reference):
    ref, common = reference
    run = tmp_path / "run"
    proc = cli([*common, f"hydra.run.dir={run}"], tmp_path / "killed.log", tmp_path, killable=True)
    try:
        wait_for_epoch_1(proc, run)
        half = (run / "checkpoints" / "last.ckpt").stat().st_size // 2
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (half, half))  # the kernel kills it halfway through
        assert proc.wait(timeout=300) == -signal.SIGXFSZ, (tmp_path / "killed.log").read_text()[-3000:]
    finally:
        proc.kill()
    assert_checkpoints_whole(run, epoch=0)
    assert len(list((run / "checkpoints").glob(".*.tmp"))) == 1  # the write the kill cut short, read by nothing

    finish(cli([f"resume={run}"], tmp_path / "resumed.log", tmp_path), tmp_path / "resumed.log")
    assert scores(run) == scores(ref)
    assert not list((run / "checkpoints").glob(".*.tmp"))  # the resumed run's first checkpoint write removed it


@pytest.mark.slow
def test_a_resume_from_a_cut_short_last_ckpt_says_so_and_starts_from_the_newest_whole_one(tmp_path, reference):
    run = copy_run(reference[0], tmp_path / "run")
    last = run / "checkpoints" / "last.ckpt"
    best = next(p for p in (run / "checkpoints").glob("epoch_*.ckpt"))
    os.truncate(last, last.stat().st_size // 2)  # as a copy over it that the disk or a kill cut short
    assert checkpoint_damage(last)

    finish(cli([f"resume={run}", "trainer.max_epochs=3"], tmp_path / "resumed.log", tmp_path), tmp_path / "resumed.log")
    output = (tmp_path / "resumed.log").read_text()
    said = [line for line in output.splitlines() if "damaged" in line]
    assert len(said) == 1 and f"{last} is damaged" in said[0] and f"resuming from {best}" in said[0], output[-3000:]
    assert "Traceback" not in output
    assert_checkpoints_whole(run, epoch=2)


def test_ckpt_path_last_and_the_sagemaker_entry_fall_back_to_the_newest_whole_checkpoint(tmp_path, caplog):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    for name, age in (("epoch_000.ckpt", 30), ("epoch_001.ckpt", 20), ("epoch_002.ckpt", 10)):
        torch.save({"epoch": int(name[6:9])}, checkpoints / name)
        os.utime(checkpoints / name, (time.time() - age,) * 2)
    torch.save({"epoch": 3}, checkpoints / "last.ckpt")
    newest = checkpoints / "epoch_002.ckpt"
    os.truncate(newest, newest.stat().st_size - 10)  # the newest, cut short too: epoch_001 is the newest whole
    assert resolve_ckpt_path("last", checkpoints) == str(checkpoints / "last.ckpt")  # whole: no questions

    (checkpoints / "last.ckpt").write_bytes(b"PK\x03\x04 cut")
    with caplog.at_level(logging.WARNING, logger="dogbreed.train"):
        assert resolve_ckpt_path("last", checkpoints) == str(checkpoints / "epoch_001.ckpt")
    assert [r.getMessage() for r in caplog.records] == [
        f"{checkpoints / 'last.ckpt'} is damaged (cut short or corrupted: File is not a zip file); resuming from "
        f"{checkpoints / 'epoch_001.ckpt'}, the newest whole checkpoint."
    ]
    # a restarted spot job: the entry gives last.ckpt by its path
    given = next(o for o in container_overrides({"SAGEMAKER_BASE_DIR": str(tmp_path)}) if o.startswith("ckpt_path="))
    assert resolve_ckpt_path(given.removeprefix("ckpt_path="), checkpoints) == str(checkpoints / "epoch_001.ckpt")
    # a checkpoint named by the user is used as given, or refused
    with pytest.raises(CheckpointError, match=r"ckpt_path=.*epoch_002.ckpt is damaged \(cut short"):
        resolve_ckpt_path(str(newest), checkpoints)


@pytest.mark.slow  # a training subprocess: about 5 s
def test_a_damaged_last_ckpt_with_no_whole_checkpoint_beside_it_stops_with_the_fix(tmp_path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(f"- experiment=demo\n- hydra.run.dir={run}\n")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04" + bytes(1000))
    (run / "checkpoints" / "epoch_000.ckpt").write_bytes(b"")
    done = subprocess.run(
        [sys.executable, "-m", "dogbreed.train", f"resume={run}"], cwd=tmp_path, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 2 and "Traceback" not in output, output
    assert f"{run}/checkpoints/last.ckpt is damaged" in output
    assert "no other checkpoint" in output and "train again from the start in a new run dir" in output


# --- a full disk ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_full_disk_stops_training_in_one_line_and_resume_finishes_the_run_once_space_is_freed(
    tmp_path, tmpfs, reference
):
    ref, common = reference
    disk = tmpfs("640m")  # epoch 0's two checkpoints (134 MB each) and the run's records
    run = disk / "run"
    proc = cli([*common, f"hydra.run.dir={run}"], tmp_path / "full.log", tmp_path)
    try:
        wait_for_epoch_1(proc, run)
        filler = fill(disk, leave=1 << 20)  # the records go on; the next checkpoint has no room
        assert proc.wait(timeout=300) == 2
    finally:
        proc.kill()
    output = (tmp_path / "full.log").read_text()
    said = [line for line in output.splitlines() if "no space left" in line.lower()]
    assert len(said) == 1, output[-3000:]
    assert "Traceback" not in output and "Errno 28" not in output
    path, needed, free = re.search(r"for (\S+): it needs ([\d.]+) MB, ([\d.]+ [kM]B) free there", said[0]).groups()
    assert Path(path).parent == run / "checkpoints" and float(needed) > 100
    assert free.endswith("kB") or float(free.split()[0]) < 2
    assert said[0].endswith(f"then continue with: python -m dogbreed.train resume={run}")
    assert_checkpoints_whole(run, epoch=0)
    assert not [p.name for p in (run / "checkpoints").iterdir() if not p.name.endswith(".ckpt")]

    filler.unlink()
    finish(cli([f"resume={run}"], tmp_path / "resumed.log", tmp_path), tmp_path / "resumed.log")
    assert scores(run) == scores(ref)


def test_any_write_the_disk_refuses_is_one_line_with_the_path_and_a_checkpoints_size(tmpfs):
    disk = tmpfs("1m")
    (disk / "checkpoints").mkdir()
    (disk / "checkpoints" / "last.ckpt").write_bytes(bytes(300_000))
    with pytest.raises(OSError) as raised, open(disk / "losses.jsonl", "wb") as f:
        f.write(bytes(2_000_000))
    line = disk_full_message(raised.value, str(disk), str(disk / "checkpoints"))
    assert "\n" not in line
    assert re.fullmatch(
        rf"Training stopped: no space left on the device for {disk}: it needs 300 kB, \d+ kB free there\. "
        rf"What was saved stays whole: free space there, then continue with: python -m dogbreed.train resume={disk}",
        line,
    ), line


def test_a_full_disk_while_building_the_decoded_cache_leaves_no_cache_and_training_decodes(
    tmp_path, tmpfs, monkeypatch, caplog
):
    root = write_varied_folder(tmp_path / "data")
    disk = tmpfs("2m")  # the pixels at short side 256: about 12 MB
    # the headers promised less than the pixels take: as if another writer took the space after the check
    monkeypatch.setattr(cache_module, "estimate_bytes", lambda *args: 1000)
    settings = {**SMALL, "image_size": 224, "resize_size": 256, "cache": True, "cache_dir": disk}
    dm = DogBreedDataModule(root, **settings)
    with caplog.at_level(logging.WARNING, logger="dogbreed.data.cache"):
        dm.setup()
    said = [r.getMessage() for r in caplog.records if "Not caching" in r.getMessage()]
    assert len(said) == 1, said
    found = re.search(r"no space left on the device for (\S+): it needs 1 kB, [\d.]+ [kM]B free there", said[0])
    folder = Path(found.group(1))
    assert folder == staging.state_dir(root, disk) / "decoded-images"
    assert sorted(p.name for p in folder.iterdir()) == []  # no pixels, no index, no meta.json, no temporary files
    assert not isinstance(dm.datasets["train"], CachedImageDataset)
    assert next(iter(dm.train_dataloader()))[0].shape[-1] == 224  # decoded from the files instead

    resize_tmpfs(disk, "64m")  # space freed: the next run builds the cache and uses it
    dm = DogBreedDataModule(root, **settings)
    dm.setup()
    assert isinstance(dm.datasets["train"], CachedImageDataset) and (folder / "meta.json").is_file()


@pytest.fixture
def s3_dataset(aws_env: str, tmp_path: Path) -> str:
    """A dataset of noisy 400x300 JPEGs (about 2 MB in all) in moto's S3; returns its URI."""
    local = write_image_folder(tmp_path / "upload", size=(400, 300), counts={"train": 8, "valid": 2, "test": 2})
    boto3.client("s3").create_bucket(Bucket="faults")
    staging.upload(local, "s3://faults/dogs")
    return "s3://faults/dogs"


def staged_files(target: Path) -> list[str]:
    return sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())


def test_staging_onto_a_disk_too_small_says_how_much_it_needs_before_writing_a_byte(s3_dataset, tmpfs):
    disk = tmpfs("512k")
    with pytest.raises(DataError) as raised:
        staging.stage(s3_dataset, disk)
    message = str(raised.value)
    target = staging.state_dir(s3_dataset, disk)
    assert "\n" not in message
    assert re.fullmatch(
        rf"staging {s3_dataset}: no space left on the device for {target}/files: it needs [\d.]+ MB, \d+ kB free "
        r"there\. Free space there or set paths.cache_dir to a larger disk, then run again \(nothing half-staged is "
        r"trusted\)\.",
        message,
    ), message
    assert staged_files(target) == []

    resize_tmpfs(disk, "16m")
    root = staging.stage(s3_dataset, disk)
    assert root == target / "files" and len(staged_files(root)) == 36


def test_a_disk_filling_up_in_the_middle_of_staging_leaves_no_file_a_later_run_trusts(s3_dataset, tmpfs, monkeypatch):
    disk = tmpfs("16m")
    real_client = staging.s3_client
    filled: list[Path] = []

    def client_that_fills_the_disk(*args: Any, **kwargs: Any) -> Any:
        """The real client; as the third object is asked for, another writer takes the disk's space."""
        client = real_client(*args, **kwargs)
        calls = 0

        def before_get_object(**kwargs: Any) -> None:
            nonlocal calls
            calls += 1
            if calls == 3:
                filled.append(fill(disk, leave=4096))

        client.meta.events.register("before-call.s3.GetObject", before_get_object)
        return client

    monkeypatch.setattr(staging, "s3_client", client_that_fills_the_disk)
    with pytest.raises(DataError, match=r"^staging s3://faults/dogs: no space left on the device for "):
        staging.stage(s3_dataset, disk)
    target = staging.state_dir(s3_dataset, disk)
    files = staged_files(target)
    assert staging.MANIFEST not in files and not [f for f in files if ".tmp" in Path(f).name or "/." in f], files
    assert len(files) == 2  # the two objects staged whole before the disk filled up: not trusted without a manifest

    filled[0].unlink()
    monkeypatch.setattr(staging, "s3_client", real_client)
    root = staging.stage(s3_dataset, disk)
    manifest = json.loads((target / staging.MANIFEST).read_text())["files"]
    assert {rel: sha256_file(root / rel) for rel in manifest} == {rel: e["sha256"] for rel, e in manifest.items()}


def test_a_file_written_into_place_on_a_full_disk_leaves_no_temporary_file_behind(tmpfs):
    disk = tmpfs("64k")
    with pytest.raises(OSError, match="No space left on device"):
        write_text(disk / "rules.json", "x" * 100_000)
    assert list(disk.iterdir()) == []  # the temporary file would hold the space a retry needs


def test_disk_full_error_is_an_enospc_oserror_that_survives_pickling(tmp_path):
    err = pickle.loads(pickle.dumps(DiskFullError(tmp_path / "x", 5_000_000)))
    assert err.errno == errno.ENOSPC
    assert str(err).startswith(f"no space left on the device for {tmp_path}/x: it needs 5.0 MB, ")


def test_a_sagemaker_job_the_disk_filled_up_under_fails_with_the_path_and_the_fix(tmpfs, monkeypatch):
    disk = tmpfs("64k")
    monkeypatch.setenv("SAGEMAKER_BASE_DIR", str(disk))  # /opt/ml
    with pytest.raises(OSError) as raised:
        (disk / "tensors.jsonl").write_bytes(bytes(100_000))  # a failed write names no file: the job's disk stands in
    reason = failure_reason(raised.value, ["trainer.max_epochs=3"])
    assert re.fullmatch(
        rf"no space left on the device for {disk}: it needs more, 0 kB free there: start the job "
        r"again with a larger sagemaker.volume_size \(GB\)\nJob overrides: trainer.max_epochs=3",
        reason,
    ), reason
