"""Checkpoint files: ``DurableCheckpointIO`` (never left half-written by a kill or a full disk), copies of
rank 0's checkpoints for hosts that cannot see its disk, and a check that every host resumes from the same one."""

from __future__ import annotations

import io
import logging
import os
import socket
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH

from dogbreed._io import format_bytes, sha256_file, write_bytes_durably

if TYPE_CHECKING:
    import lightning as L

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint or run directory to resume from that is not there, or not the same on every host."""


class DurableCheckpointIO(TorchCheckpointIO):
    """Lightning's ``torch.save`` checkpoints, written to a temporary file in their own folder and renamed.

    Lightning stages a checkpoint in the system's temporary folder and moves it into place; where that is
    another file system (a run dir on its own disk, ``/opt/ml/checkpoints``) the move is a copy over the old
    file, so a kill or a full disk during the copy leaves a ``last.ckpt`` cut short where a whole one was, and
    the resume fails in ``torch.load``. Here the old file stays until the new one is complete and fsynced
    beside it (see :func:`dogbreed._io.write_bytes_durably`); a checkpoint the disk has no room for is a
    one-line :class:`dogbreed._io.DiskFullError` naming the file, its size and the space free.
    ``checkpoint_bytes`` is the size of the last one written. URLs (``s3://``) are left to Lightning.
    """

    def __init__(self) -> None:
        self.checkpoint_bytes: int | None = None
        self._swept: set[Path] = set()

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        folder = Path(path).parent
        if folder not in self._swept:  # before the free-space check: the space they hold counts
            self._swept.add(folder)
            remove_leftovers(folder)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        self.checkpoint_bytes = buffer.getbuffer().nbytes
        write_bytes_durably(Path(path), buffer.getbuffer())


def remove_leftovers(folder: Path) -> None:
    """Delete the temporary files of checkpoint writes that other processes did not finish (killed inside one).

    Each holds up to a checkpoint's size that a full disk needs; nothing reads them. A run writes its
    checkpoints from one process (rank 0), so another process's temporary file in its folder is a dead one.
    """
    for tmp in folder.glob(".*.ckpt.*.tmp"):
        if tmp.name.rsplit(".", 2)[-2] != str(os.getpid()):
            log.info("Removing %s, a checkpoint write that a killed process left unfinished", tmp)
            tmp.unlink(missing_ok=True)


def checkpoint_damage(path: Path) -> str | None:
    """Why ``path`` is not a whole checkpoint, or None when it is.

    ``torch.save`` writes a zip archive: a file cut short lacks the central directory at its end, and
    changed bytes fail a member's CRC-32. Checked here, a damaged file is one line instead of torch.load's
    ``PytorchStreamReader failed reading zip archive`` traceback deep inside ``Trainer.fit``.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, EOFError, zipfile.BadZipFile) as err:
        return f"cut short or corrupted: {err}"
    return f"{bad} fails its CRC-32" if bad else None


def share_checkpoint(trainer: L.Trainer, path: str) -> None:
    """Copy the checkpoint at ``path`` from global rank 0 to every host whose disk lacks it; a collective call.

    Rank 0 writes the checkpoints, on its own host's disk; on SageMaker every instance has a disk of its own
    (``/opt/ml/checkpoints`` is synced to S3, not shared), so ``trainer.test(ckpt_path=best)`` on the other hosts
    would find no file. Where every rank sees it (one machine, a shared file system) nothing moves.
    """
    if trainer.world_size == 1 or "://" in path:
        return
    strategy = trainer.strategy
    if not strategy.reduce_boolean_decision(not Path(path).is_file(), all=False):
        return
    data = strategy.broadcast(Path(path).read_bytes() if trainer.is_global_zero else None)
    if trainer.local_rank == 0 and not Path(path).is_file():
        log.info("Copying %s (%s) from rank 0's host to this one", path, format_bytes(len(data)))
        write_bytes_durably(Path(path), data)
    strategy.barrier("share_checkpoint")


def agree_on_checkpoint(trainer: L.Trainer, ckpt_path: str | None) -> None:
    """Stop every process with one :class:`CheckpointError` where they would start from different checkpoints.

    Each host picks its checkpoint from its own disk: on SageMaker, the ``last.ckpt`` that the job's
    ``checkpoint_s3_uri`` restored to that instance. Should one host lack it, or hold another epoch's, its
    processes would train from another epoch than rank 0's and the collectives would stall or mix the two runs;
    here every process compares the SHA-256 of what it would load (a collective call) before anything is
    restored.
    """
    if trainer.world_size == 1:
        return
    mine = sha256_file(Path(ckpt_path)) if ckpt_path and "://" not in ckpt_path else ckpt_path
    everyone: list[Any] = [None] * trainer.world_size
    torch.distributed.all_gather_object(everyone, (socket.gethostname(), ckpt_path, mine))
    if len({digest for _, _, digest in everyone}) == 1:
        return
    starts = "; ".join(
        f"rank {rank} on {host}: {f'{path} (sha256 {digest[:12]})' if path else 'no checkpoint, epoch 0'}"
        for rank, (host, path, digest) in enumerate(everyone)
    )
    raise CheckpointError(
        f"the processes would resume from different checkpoints ({starts}). Every host must start from the same "
        "one: on SageMaker each instance resumes from what checkpoint_s3_uri restored to its /opt/ml/checkpoints, "
        "so start the job again once that prefix holds one whole last.ckpt, or empty it to train from the start."
    )
