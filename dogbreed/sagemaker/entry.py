"""The training container's entry point: SageMaker's job layout -> Hydra overrides -> ``train(cfg)``.

SageMaker runs ``dogbreed_entry.py`` (written by the launcher next to the shipped ``dogbreed/`` and
``conf/``), which calls :func:`main`. Inputs, by SageMaker's contract:

- ``<base>/input/config/hyperparameters.json`` (values JSON-encoded strings): the user's Hydra overrides;
- ``SM_CHANNEL_TRAINING``: the dataset (``data.source``); ``SM_CHANNEL_WEIGHTS``: a state-dict file for
  ``model.weights`` (how network-isolated jobs get pretrained weights);
- ``SM_MODEL_DIR`` -> ``paths.model_dir`` (uploaded as ``model.tar.gz``), ``SM_OUTPUT_DATA_DIR`` ->
  ``paths.output_dir`` (uploaded as ``output.tar.gz``);
- ``<base>/checkpoints`` (synced with ``checkpoint_s3_uri``) -> ``paths.checkpoint_dir``; a ``last.ckpt``
  there (a restarted spot job) resumes training.

``<base>`` is ``/opt/ml``, or ``SAGEMAKER_BASE_DIR`` as in SageMaker's training toolkit.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

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
    return overrides


def job_overrides(env: Mapping[str, str] = os.environ) -> list[str]:
    """The user's overrides from the hyperparameters, then the container's locations."""
    return [*hyperparameters_to_overrides(read_hyperparameters(env)), *container_overrides(env)]


def main() -> None:
    """Compose ``conf/train.yaml`` with the job's overrides and train; metric lines go to stdout (CloudWatch)."""
    from hydra import compose, initialize_config_dir

    from dogbreed.config import CONFIG_DIR
    from dogbreed.train import train

    logging.basicConfig(
        stream=sys.stdout, level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] %(message)s", force=True
    )
    overrides = job_overrides()
    log.info("Overrides: %s", " ".join(overrides))
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
            cfg = compose("train", overrides=overrides)
        metrics = train(cfg)
    except Exception as err:
        # SageMaker shows this file as the job's FailureReason
        failure = base_dir() / "output" / "failure"
        failure.parent.mkdir(parents=True, exist_ok=True)
        failure.write_text(f"{type(err).__name__}: {err}"[:1000])
        raise
    log.info("Finished: objective=%s", metrics.get("objective"))


if __name__ == "__main__":
    main()
