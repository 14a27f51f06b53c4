"""Where a tuning study lives (``tune.storage``), and how a killed worker's trial is failed and retried once.

Pick by how the trials run:

- SQLite (the default, ``study.db`` in the tune dir): one process, several threads (``tune.n_jobs``). Optuna's
  maintainers advise against it for several processes: writers wait on one file lock.
- ``journal:PATH``: Optuna's ``JournalStorage`` on an append-only file, for several processes on one
  machine, or on machines sharing a file system that supports ``O_APPEND`` and links (not every NFS does).
- ``postgresql+psycopg://user:password@host/db`` (or any SQLAlchemy URL): several machines.

A worker killed mid-trial (SIGKILL, a lost spot instance) cannot mark its trial failed. The RDB storages get
Optuna's heartbeat: each running trial writes one every ``heartbeat_interval`` seconds, and a trial silent for
``grace_period`` seconds is failed by the next worker to start a trial and retried once with the same
parameters. Optuna has no heartbeat for the journal, so :func:`trial_heartbeat` and :func:`fail_stale_trials`
do the same there with a user attribute.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

log = logging.getLogger(__name__)

JOURNAL_PREFIX = "journal:"
HEARTBEAT_ATTR = "heartbeat"  # a journal trial's last sign of life, time.time()
RETRY_OF_ATTR = "retry_of"  # a journal retry's failed trial
SCHEMA_ATTEMPTS = 3


def make_storage(url: str, *, heartbeat_interval: int | None, grace_period: int | None) -> optuna.storages.BaseStorage:
    """The storage ``url`` names: ``journal:PATH``, or an SQLAlchemy URL for Optuna's RDB storage."""
    if url.startswith(JOURNAL_PREFIX):
        path = url.removeprefix(JOURNAL_PREFIX)
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(path))
    kwargs: dict[str, Any] = {"engine_kwargs": {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}}
    if heartbeat_interval:
        kwargs |= {
            "heartbeat_interval": heartbeat_interval,
            "grace_period": grace_period,
            "heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
        }
    import sqlalchemy.exc

    attempt = 1
    while True:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, **kwargs)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as err:
            # workers started together on an empty database race to create Optuna's tables: one wins, the
            # others find them on the next try
            if attempt == SCHEMA_ATTEMPTS:
                raise
            log.info("Optuna's tables are being created by another worker (%s); trying again", type(err).__name__)
            time.sleep(attempt)
            attempt += 1


def is_journal(study: optuna.Study) -> bool:
    return isinstance(study._storage, optuna.storages.JournalStorage)


@contextlib.contextmanager
def trial_heartbeat(trial: optuna.Trial, interval: int | None) -> Iterator[None]:
    """While the block runs, record a journal trial's heartbeat every ``interval`` seconds (RDB: Optuna does)."""
    if not interval or not is_journal(trial.study):
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            trial.set_user_attr(HEARTBEAT_ATTR, time.time())

    trial.set_user_attr(HEARTBEAT_ATTR, time.time())
    thread = threading.Thread(target=beat, name=f"heartbeat-trial-{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def fail_stale_trials(study: optuna.Study, grace_period: int | None) -> list[int]:
    """Fail the journal's running trials silent for over ``grace_period`` s and enqueue each once again.

    Returns the numbers of the trials this worker failed. When two workers find the same trial, the journal
    applies the first ``FAIL`` and refuses the second, so only one of them enqueues the retry.
    """
    if not grace_period or not is_journal(study):
        return []
    failed = []
    now = time.time()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        last = trial.user_attrs.get(HEARTBEAT_ATTR) or trial.datetime_start.timestamp()
        if now - last <= grace_period:
            continue
        try:  # Optuna has no public call to fail another worker's trial
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except UpdateFinishedTrialError:
            continue  # another worker failed it first, or it just finished
        failed.append(trial.number)
        log.warning("Trial %d sent no heartbeat for %.0f s: failed", trial.number, now - last)
        if RETRY_OF_ATTR not in trial.user_attrs:  # retried once, as RetryHeartbeatStaleTrialCallback(max_retry=1)
            study.enqueue_trial(trial.params, user_attrs={RETRY_OF_ATTR: trial.number}, skip_if_exists=False)
    return failed
