"""Resume: killed with SIGKILL and resumed by run directory, a run ends exactly as an uninterrupted one."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from dogbreed.callbacks import CheckpointError, Debugger, Profiler, agree_on_checkpoint
from dogbreed.callbacks.resume import rng_states, set_rng_states
from dogbreed.train import resume_overrides

from .conftest import free_port
from .test_debugger import TinyClassifier, tensors

EPOCHS, BATCHES, KILL_EPOCH = 3, 6, 2  # killed 3 steps into epoch 2: last.ckpt then holds epoch 1
SMALL_DEMO = [
    "experiment=demo", "data.image_size=28", "data.resize_size=32", "data.num_workers=1",  # seeded per epoch
    f"trainer.max_epochs={EPOCHS}",
    f"+trainer.limit_train_batches={BATCHES}", "+trainer.limit_val_batches=2", "+trainer.limit_test_batches=2",
    "~callbacks.progress_bar", "report=false", "callbacks.debugger.flush_every=1",  # every loss on disk at once
]  # fmt: skip


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def duplicates(records: list[dict[str, Any]]) -> int:
    counts = Counter((r["step"], r["mode"], r.get("name")) for r in records)
    return sum(n - 1 for n in counts.values())


def train_steps(losses_file: Path) -> list[int]:
    """Training steps in ``losses.jsonl`` so far (a line being written may be cut short)."""
    steps = []
    for line in losses_file.read_text().splitlines() if losses_file.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record["mode"] == "train":
            steps.append(record["step"])
    return steps


def cli(args: list[str], log: Path, cwd: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "dogbreed.train", *args], cwd=cwd, stdout=out, stderr=out)


def finish(proc: subprocess.Popen, log: Path) -> None:
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]


def last_checkpoint(run: Path) -> dict[str, Any]:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_a_run_killed_with_sigkill_and_resumed_by_run_dir_ends_as_if_never_stopped(tmp_path):
    common = [*SMALL_DEMO, f"paths.cache_dir={tmp_path / 'cache'}"]  # one decoded-image cache: built, then loaded
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    finish(cli([*common, f"hydra.run.dir={whole}"], tmp_path / "whole.log", tmp_path), tmp_path / "whole.log")

    proc = cli([*common, f"hydra.run.dir={killed}"], tmp_path / "killed.log", tmp_path)
    deadline = time.monotonic() + 300
    try:
        while max(train_steps(killed / "debug-output" / "losses.jsonl"), default=-1) < KILL_EPOCH * BATCHES + 2:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "the run did not reach the step to kill it at"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    at_kill = last_checkpoint(killed)
    assert (at_kill["epoch"], at_kill["global_step"]) == (KILL_EPOCH - 1, KILL_EPOCH * BATCHES)

    finish(cli([f"resume={killed}"], tmp_path / "resumed.log", tmp_path), tmp_path / "resumed.log")

    expected, got = (json.loads((run / "metrics.json").read_text()) for run in (whole, killed))
    assert {k: v for k, v in got.items() if k.startswith("test/")} == {
        k: v for k, v in expected.items() if k.startswith("test/")
    }
    assert got["wall_time_s"] > at_kill["dogbreed_resume_state"]["wall_time_s"]  # counts the killed process too
    for run in (whole, killed):
        assert (last_checkpoint(run)["epoch"], last_checkpoint(run)["global_step"]) == (EPOCHS - 1, EPOCHS * BATCHES)
        losses = read_jsonl(run / "debug-output" / "losses.jsonl")
        assert [r["step"] for r in losses if r["mode"] == "train"] == list(range(EPOCHS * BATCHES))
        assert duplicates(losses) == 0
        assert duplicates(read_jsonl(run / "debug-output" / "tensors.jsonl")) == 0
        steps = read_jsonl(run / "profiler-output" / "steps.jsonl")
        assert [s["step"] for s in steps] == list(range(EPOCHS * BATCHES))
    assert (killed / "debug-output" / "losses.jsonl").read_text().count('"eval"') == EPOCHS * 2


def _tiny_fit(run: Path, epochs: int, ckpt_path: Path | None = None) -> None:
    """Three 4-step epochs with the debugger and profiler, a checkpoint per epoch in ``run/ckpt``."""
    L.seed_everything(0)
    checkpoints = ModelCheckpoint(dirpath=run / "ckpt", filename="{epoch}", save_top_k=-1)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=[Debugger(run_dir=run, save_interval=2, flush_every=1),
                                           Profiler(run_dir=run, monitor_interval=1.0), checkpoints],
    )  # fmt: skip
    train, val = DataLoader(tensors(64), batch_size=16, shuffle=True), DataLoader(tensors(32, seed=1), batch_size=16)
    trainer.fit(TinyClassifier(), train, val, ckpt_path=ckpt_path)


def test_debugger_and_profiler_count_on_from_the_checkpoint_and_drop_what_was_written_past_it(tmp_path):
    _tiny_fit(tmp_path, epochs=3)  # as if killed at the very end: the records reach past the epoch-1 checkpoint
    with open(tmp_path / "debug-output" / "losses.jsonl", "a") as f:
        f.write('{"step": 12, "mo')  # a line cut short by the kill
    _tiny_fit(tmp_path, epochs=3, ckpt_path=tmp_path / "ckpt" / "epoch=1.ckpt")

    losses = read_jsonl(tmp_path / "debug-output" / "losses.jsonl")
    assert [r["step"] for r in losses if r["mode"] == "train"] == list(range(12))
    assert [r["step"] for r in losses if r["mode"] == "eval"] == list(range(6))
    assert duplicates(losses) == 0
    tensors_saved = read_jsonl(tmp_path / "debug-output" / "tensors.jsonl")
    assert duplicates(tensors_saved) == 0 and {r["step"] for r in tensors_saved if r["mode"] == "train"} >= {8, 10}
    assert [s["step"] for s in read_jsonl(tmp_path / "profiler-output" / "steps.jsonl")] == list(range(12))


def test_rng_states_survive_a_weights_only_checkpoint(tmp_path):
    torch.save(rng_states(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.random(), np.random.rand(), torch.rand(1)
    set_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_resume_overrides_replay_the_run_then_the_new_ones(tmp_path):
    (tmp_path / ".hydra").mkdir()
    saved = ["experiment=demo", "trainer.max_epochs=3", "ckpt_path=last", "~callbacks.progress_bar"]
    (tmp_path / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in saved))
    assert resume_overrides(tmp_path, ["trainer.max_epochs=5"]) == [
        "experiment=demo", "~callbacks.progress_bar", "trainer.max_epochs=5", f"hydra.run.dir='{tmp_path}'",
        "ckpt_path=last",
    ]  # fmt: skip


def _cli_error(args: list[str], cwd: Path) -> str:
    """Run the CLI expecting a user error: exit code 2, no traceback; return its output."""
    done = subprocess.run(
        [sys.executable, "-m", "dogbreed.train", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "Traceback" not in output
    return output


@pytest.mark.slow  # a training subprocess: about 5-11 s
def test_cli_missing_checkpoint_is_one_line(tmp_path):
    output = _cli_error(["experiment=demo", f"ckpt_path={tmp_path}/nowhere.ckpt"], tmp_path)
    assert f"ckpt_path={tmp_path}/nowhere.ckpt does not exist" in output


@pytest.mark.slow  # a training subprocess: about 5-11 s
def test_cli_ckpt_path_last_without_a_checkpoint_says_so(tmp_path):
    output = _cli_error(["experiment=demo", "ckpt_path=last", f"hydra.run.dir={tmp_path}/run"], tmp_path)
    assert f"ckpt_path=last but {tmp_path}/run/checkpoints has no last.ckpt" in output


@pytest.mark.slow  # a training subprocess: about 5-11 s
def test_cli_resume_names_what_the_run_dir_lacks(tmp_path):
    output = _cli_error([f"resume={tmp_path}/nothing"], tmp_path)
    assert f"{tmp_path}/nothing/.hydra/overrides.yaml is missing" in output
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("- experiment=demo\n")  # killed before its first epoch ended
    output = _cli_error([f"resume={run}"], tmp_path)
    assert f"{run}/checkpoints has no last.ckpt" in output


def _agree(rank: int, port: int, paths: list[str | None], verdicts: Any) -> None:
    """One process of a two-process gloo group: what agree_on_checkpoint said about this rank's path."""
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        agree_on_checkpoint(SimpleNamespace(world_size=2), paths[rank])
        verdicts.put((rank, "agreed"))
    except CheckpointError as err:
        verdicts.put((rank, str(err)))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # two spawned processes, each importing torch: about 6 s a case
@pytest.mark.parametrize("case", ["same file", "one host without", "other epochs"])
def test_processes_that_would_resume_from_different_checkpoints_all_stop(case: str, tmp_path: Path) -> None:
    """A host whose disk lacks the checkpoint (or holds another epoch's) stops every process, before a restore."""
    epochs = [tmp_path / "host-1" / "last.ckpt", tmp_path / "host-2" / "last.ckpt"]
    for epoch, path in enumerate(epochs):
        path.parent.mkdir()
        torch.save({"epoch": epoch}, path)
    paths = {
        "same file": [str(epochs[0]), str(epochs[0])],
        "one host without": [str(epochs[0]), None],
        "other epochs": [str(p) for p in epochs],
    }[case]
    context = torch.multiprocessing.get_context("spawn")
    verdicts = context.Queue()
    torch.multiprocessing.start_processes(
        _agree, args=(free_port(), paths, verdicts), nprocs=2, start_method="spawn", join=True
    )
    said = dict(verdicts.get(timeout=10) for _ in range(2))
    if case == "same file":
        assert said == {0: "agreed", 1: "agreed"}
        return
    assert said[0] == said[1], "every process stops with the same reason"
    assert said[0].startswith("the processes would resume from different checkpoints (rank 0 on ")
    assert f"{epochs[0]} (sha256 " in said[0]
    assert ("no checkpoint, epoch 0" if case == "one host without" else f"{epochs[1]} (sha256 ") in said[0]
    assert "start the job again once that prefix holds one whole last.ckpt" in said[0]
