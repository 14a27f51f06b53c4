"""The training container's entry point: SageMaker's job layout -> Hydra overrides -> ``train(cfg)``.

SageMaker runs ``dogbreed_entry.py`` (written by the launcher next to the shipped ``dogbreed/`` and
``conf/``), which calls :func:`main`. Inputs, by SageMaker's contract:

- ``<base>/input/config/hyperparameters.json`` (values JSON-encoded strings): the user's Hydra overrides;
- ``SM_CHANNEL_TRAINING``: the dataset (``data.source``); ``SM_CHANNEL_WEIGHTS``: a state-dict file for
  ``model.weights`` (how network-isolated jobs get pretrained weights);
- ``SM_MODEL_DIR`` -> ``paths.model_dir`` (uploaded as ``model.tar.gz``), ``SM_OUTPUT_DATA_DIR`` ->
  ``paths.output_dir`` (uploaded as ``output.tar.gz``);
- ``<base>/checkpoints`` (synced with ``checkpoint_s3_uri``) -> ``paths.checkpoint_dir``; a ``last.ckpt``
  there (a restarted spot job) resumes training (from the newest whole checkpoint there where ``last.ckpt``
  is damaged: see :func:`dogbreed.train.resolve_ckpt_path`). A job without that dir keeps its checkpoints in
  scratch space (``$TMPDIR/dogbreed-checkpoints``), so that ``output.tar.gz`` carries no checkpoints: the test with
  the best checkpoint still runs, and only the exported model leaves the job.

``<base>`` is ``/opt/ml``, or ``SAGEMAKER_BASE_DIR`` as in SageMaker's training toolkit. The job prints no
progress bar: its carriage-return updates would share a line with the metric lines, and its rounded values
would match the metric regexes too.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from omegaconf import DictConfig, open_dict

import dogbreed
from dogbreed._io import DiskFullError, is_disk_full
from dogbreed.sagemaker.hyperparameters import hyperparameters_to_overrides

log = logging.getLogger(__name__)

DATA_CHANNEL = "training"
WEIGHTS_CHANNEL = "weights"
ENTRY_SCRIPT = "dogbreed_entry.py"


def base_dir(env: Mapping[str, str] = os.environ) -> Path:
    return Path(env.get("SAGEMAKER_BASE_DIR", "/opt/ml"))


def read_hyperparameters(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """``hyperparameters.json`` of the job, ``{}`` when the job has none."""
    config_dir = Path(env.get("SM_INPUT_CONFIG_DIR", base_dir(env) / "input" / "config"))
    path = config_dir / "hyperparameters.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _channel_env(channel: str) -> str:
    return f"SM_CHANNEL_{channel.upper()}"


def _single_file(folder: Path, channel: str) -> Path:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if len(files) != 1:
        raise ValueError(
            f"the {channel!r} channel ({folder}) must hold exactly one state-dict file, found {len(files)}; "
            "point sagemaker's weights input at a single .pth file."
        )
    return files[0]


def container_overrides(env: Mapping[str, str] = os.environ) -> list[str]:
    """Overrides that map the job's channels and directories onto the config (they win over the user's)."""
    overrides = []
    if data := env.get(_channel_env(DATA_CHANNEL)):
        overrides.append(f"data.source={data}")
    if weights := env.get(_channel_env(WEIGHTS_CHANNEL)):
        overrides.append(f"model.weights={_single_file(Path(weights), WEIGHTS_CHANNEL)}")
    output_dir = env.get("SM_OUTPUT_DATA_DIR", str(base_dir(env) / "output" / "data"))
    overrides.append(f"paths.output_dir={output_dir}")
    overrides.append(f"paths.model_dir={env.get('SM_MODEL_DIR', str(base_dir(env) / 'model'))}")
    # staged-data checks and downloaded weights: a scratch cache, not part of the job's outputs
    overrides.append(f"paths.cache_dir={Path(tempfile.gettempdir()) / 'dogbreed-cache'}")
    checkpoints = base_dir(env) / "checkpoints"
    if checkpoints.is_dir():
        overrides.append(f"paths.checkpoint_dir={checkpoints}")
        if (checkpoints / "last.ckpt").is_file():
            overrides.append(f"ckpt_path={checkpoints / 'last.ckpt'}")
    else:
        # not under output/data: SageMaker would upload every checkpoint (3x the model each) in output.tar.gz
        overrides.append(f"paths.checkpoint_dir={Path(tempfile.gettempdir()) / 'dogbreed-checkpoints'}")
    return overrides


def failure_reason(err: BaseException, given: Sequence[str]) -> str:
    """What ``<base>/output/failure`` says: the error, then the user's overrides.

    SageMaker shows the file's first 1024 characters as the job's FailureReason. Hydra names a bad key or
    config group itself; a wrong value that fails deep in training (``'>' not supported between 'int' and
    'str'``) does not, so the overrides the job was given follow the error. A full disk names the path, the
    space needed and free, and the fix, instead of ``[Errno 28] No space left on device``.
    """
    overrides = f"\nJob overrides: {' '.join(given)}"[:400] if given else ""
    if is_disk_full(err):
        path = getattr(err, "filename", None) or base_dir()  # a failed write() names no file: the job's disk
        full = err if isinstance(err, DiskFullError) else DiskFullError(path, None)
        reason = f"{full}: start the job again with a larger sagemaker.volume_size (GB)"
    else:
        reason = f"{type(err).__name__}: {err}"
    return reason[: 1024 - len(overrides)] + overrides


def without_progress_bar(cfg: DictConfig) -> DictConfig:
    """Drop progress-bar callbacks and turn Lightning's default bar off: the job's log is for metric lines.

    Works on the composed config (not as overrides), so ``callbacks=none`` or a user's own bar are no error.
    """
    from hydra.utils import get_class
    from lightning.pytorch.callbacks import ProgressBar

    with open_dict(cfg):
        callbacks = cfg.get("callbacks") or {}
        for name in [n for n, c in callbacks.items() if isinstance(c, DictConfig) and "_target_" in c]:
            try:
                is_bar = issubclass(get_class(callbacks[name]._target_), ProgressBar)
            except ImportError:
                continue  # not ours to judge: instantiating it reports the error
            if is_bar:
                log.info("No progress bar in a SageMaker job: dropping callbacks.%s", name)
                del callbacks[name]
        cfg.trainer.enable_progress_bar = False
    return cfg


def main() -> None:
    """Compose ``conf/train.yaml`` with the job's overrides and train; metric lines go to stdout (CloudWatch)."""
    from dogbreed.config import compose_config
    from dogbreed.train import train

    # one write per line: the toolkit reads stdout in chunks and cuts lines where a block buffer would split them
    sys.stdout.reconfigure(line_buffering=True)
    logging.basicConfig(
        stream=sys.stdout, level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] %(message)s", force=True
    )
    # which copy runs: the job's source dir, not a dogbreed the image happens to have installed
    log.info("dogbreed %s from %s", dogbreed.__version__, Path(dogbreed.__file__).parent)
    given: list[str] = []
    try:
        given = hyperparameters_to_overrides(read_hyperparameters())
        overrides = [*given, *container_overrides()]  # the container's locations win over the user's
        log.info("Overrides: %s", " ".join(overrides))
        cfg = without_progress_bar(compose_config("train", overrides))
        metrics = train(cfg)
    except Exception as err:
        failure = base_dir() / "output" / "failure"  # the toolkit keeps an existing one
        failure.parent.mkdir(parents=True, exist_ok=True)
        failure.write_text(failure_reason(err, given))
        raise
    log.info("Finished: objective=%s", metrics.get("objective"))


if __name__ == "__main__":
    main()
