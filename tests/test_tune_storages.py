"""One study, several ``dogbreed-tune`` processes, on the storages meant for that: a journal file and PostgreSQL.

Real processes on a real server (conftest's ``postgres_url``): two workers finish the study together with no
trial run twice, and a worker killed with SIGKILL mid-trial has its trial failed after the grace period and
retried once by the next worker, which still ends the study with the requested number of trials.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from dogbreed.rundir import TRIALS_CSV, trial_dir
from dogbreed.study_storage import RETRY_OF_ATTR, make_storage

SMALL = [
    "experiment=demo", "trainer.max_epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1",
    "data.num_workers=0", "data.cache=false", "data.image_size=32", "data.resize_size=36", "report=false",
    "callbacks=none", "tune.pruner=none", "tune.n_startup_trials=1",
]  # fmt: skip
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # two torch processes on two cores


@pytest.fixture(params=["journal", "postgresql"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "journal":
        return f"journal:{tmp_path / 'study.log'}"
    return request.getfixturevalue("postgres_url")


def tune_command(run_dir: Path, storage: str, study: str, n_trials: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "dogbreed.tune", *SMALL, f"tune.storage={storage}", f"tune.study_name={study}",
        f"tune.n_trials={n_trials}", f"hydra.run.dir={run_dir}", *extra,
    ]  # fmt: skip


def load(storage: str, study: str) -> optuna.Study:
    return optuna.load_study(
        study_name=study, storage=make_storage(storage, heartbeat_interval=None, grace_period=None)
    )


def start(run_dir: Path, storage: str, study: str, n_trials: int, *extra: str) -> subprocess.Popen:
    """``dogbreed.tune`` in the background, writing its run dir and its output (``tune.out``) to ``run_dir``."""
    run_dir.mkdir()
    with open(run_dir / "tune.out", "w") as log:
        command = tune_command(run_dir, storage, study, n_trials, *extra)
        return subprocess.Popen(command, env=ENV, stdout=log, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, run_dir: Path) -> None:
    assert proc.wait(timeout=600) == 0, (run_dir / "tune.out").read_text()[-5000:]


@pytest.mark.slow
def test_two_workers_finish_one_study_together(storage: str, tmp_path: Path) -> None:
    study, n_trials = f"two-{tmp_path.name}"[:60], 4
    workers = [tmp_path / "worker0", tmp_path / "worker1"]
    procs = [start(worker, storage, study, n_trials) for worker in workers]
    for proc, worker in zip(procs, workers, strict=True):
        finish(proc, worker)

    trials = load(storage, study).get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in FINISHED]
    # each worker checks the count after its own trial (Optuna's MaxTrialsCallback): one more at most per extra worker
    assert n_trials <= len(finished) <= n_trials + 1
    assert [t.state for t in trials if t.state not in FINISHED] == []
    ran_by = {t.number: [w for w in workers if trial_dir(w, t.number).is_dir()] for t in trials}
    assert all(len(where) == 1 for where in ran_by.values()), ran_by  # no trial ran twice
    assert {where[0] for where in ran_by.values()} == set(workers)  # both took part
    last = max(workers, key=lambda w: (w / TRIALS_CSV).stat().st_mtime)  # its results list the whole study
    with open(last / TRIALS_CSV, newline="") as f:
        assert sorted(int(row["trial"]) for row in csv.DictReader(f)) == sorted(ran_by)
    assert (last / "report" / "tuning-report.html").is_file()


@pytest.mark.slow
def test_threads_of_one_process_share_the_default_sqlite_study(tmp_path: Path) -> None:
    """SQLite, the default: one process, ``tune.n_jobs`` threads each running trials."""
    finish(start(tmp_path / "tune", "null", "threads", 3, "tune.n_jobs=2"), tmp_path / "tune")
    trials = load(f"sqlite:///{tmp_path / 'tune' / 'study.db'}", "threads").get_trials(deepcopy=False)
    assert 3 <= len(trials) <= 4 and all(t.state in FINISHED for t in trials)
    assert all(trial_dir(tmp_path / "tune", t.number).is_dir() for t in trials)


@pytest.mark.slow
def test_a_killed_worker_trial_is_failed_and_retried_once(storage: str, tmp_path: Path) -> None:
    study, n_trials = f"killed-{tmp_path.name}"[:60], 3
    heartbeat = ["tune.heartbeat_interval=1", "tune.grace_period=4"]
    victim = start(tmp_path / "killed", storage, study, n_trials, *heartbeat)
    deadline = time.monotonic() + 180
    running: list[optuna.trial.FrozenTrial] = []
    while not (running and running[0].params and trial_dir(tmp_path / "killed", running[0].number).is_dir()):
        assert victim.poll() is None and time.monotonic() < deadline, "no trial started training"
        time.sleep(0.5)
        try:
            running = load(storage, study).get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        except KeyError:  # the study is not created yet
            running = []
    victim.kill()  # SIGKILL: no chance to mark its trial failed
    victim.wait(timeout=30)
    (killed,) = running
    finish(start(tmp_path / "next", storage, study, n_trials, *heartbeat), tmp_path / "next")

    trials = load(storage, study).get_trials(deepcopy=False)
    assert [t.number for t in trials if t.state == TrialState.FAIL] == [killed.number]
    assert killed.params  # it was training: its parameters sampled, its run dir written
    retries = [
        t for t in trials
        if t.system_attrs.get("failed_trial") == killed.number or t.user_attrs.get(RETRY_OF_ATTR) == killed.number
    ]  # fmt: skip
    assert len(retries) == 1 and retries[0].params == killed.params and retries[0].state in FINISHED
    assert len([t for t in trials if t.state in FINISHED]) == n_trials
    assert [t.state for t in trials if t.state == TrialState.RUNNING] == []
