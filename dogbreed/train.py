"""Train, test with the best checkpoint, and export the model: ``python -m dogbreed.train [overrides]``.

``train(cfg)`` is the one path from a composed config to a run directory; the Hydra entry point, the
tuner and the SageMaker container all call it. ``python -m dogbreed.train resume=RUN_DIR [overrides]``
continues an interrupted run in its own directory, with its own overrides, from its ``last.ckpt`` (or, when
that file is damaged, the newest whole checkpoint beside it).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from dogbreed._io import DiskFullError, is_disk_full
from dogbreed.artifacts import write_model_dir, write_test_results
from dogbreed.callbacks import CheckpointError, ResumeState, checkpoint_damage, share_checkpoint
from dogbreed.config import CONFIG_DIR
from dogbreed.data import DataError, DogBreedDataModule
from dogbreed.models import DogBreedClassifier, WeightsError
from dogbreed.models.backbone import BackboneError, build_backbone_kwargs
from dogbreed.report import report_run
from dogbreed.rundir import METRICS
from dogbreed.tracking import MLflowRunLogger

log = logging.getLogger(__name__)

LAST_CHECKPOINT = "last.ckpt"


def instantiate_group(group: DictConfig | None, kind: str) -> list[Any]:
    """Instantiate every entry of a dict-of-configs group (callbacks, loggers) that has a ``_target_``."""
    objects = []
    for name, conf in (group or {}).items():
        if isinstance(conf, DictConfig) and "_target_" in conf:
            log.info("Instantiating %s %s <%s>", kind, name, conf._target_)
            objects.append(instantiate(conf))
    return objects


def resolve_ckpt_path(ckpt_path: str | None, checkpoint_dir: str | Path) -> str | None:
    """The checkpoint to start from: an existing file, or ``last`` -> ``<checkpoint_dir>/last.ckpt``; None for none.

    Lightning would train from scratch on a ``last`` it cannot find and fail with a long traceback on a
    missing or damaged path; each is a one-line :class:`CheckpointError` here, except a damaged
    ``last.ckpt`` of this run (``last``, or its path, as the SageMaker entry gives it): the run then starts
    from the newest whole checkpoint beside it, saying so. URLs are left for Lightning to open.
    """
    if not ckpt_path:
        return None
    last = Path(checkpoint_dir) / LAST_CHECKPOINT
    if ckpt_path == "last" or ("://" not in ckpt_path and Path(ckpt_path).absolute() == last.absolute()):
        return str(last_whole_checkpoint(Path(checkpoint_dir)))
    if "://" in ckpt_path:
        return ckpt_path
    if not Path(ckpt_path).is_file():
        raise CheckpointError(
            f"ckpt_path={ckpt_path} does not exist: give an existing .ckpt file, or resume a run with resume=RUN_DIR."
        )
    if damage := checkpoint_damage(Path(ckpt_path)):
        raise CheckpointError(f"ckpt_path={ckpt_path} is damaged ({damage}): give a whole .ckpt file.")
    return ckpt_path


def last_whole_checkpoint(checkpoint_dir: Path) -> Path:
    """``checkpoint_dir/last.ckpt``, or where it is damaged (a copy cut short, a disk that filled up) the newest
    whole ``*.ckpt`` beside it, by modification time; a :class:`CheckpointError` with the fix when there is none."""
    last = checkpoint_dir / LAST_CHECKPOINT
    if not last.is_file():
        raise CheckpointError(
            f"ckpt_path=last but {checkpoint_dir} has no {LAST_CHECKPOINT} (no epoch finished there): resume a run "
            "with resume=RUN_DIR, or give ckpt_path=PATH/TO/last.ckpt."
        )
    damage = checkpoint_damage(last)
    if damage is None:
        return last
    others = sorted((p for p in checkpoint_dir.glob("*.ckpt") if p != last), key=lambda p: p.stat().st_mtime)
    for candidate in reversed(others):
        if checkpoint_damage(candidate) is None:
            log.warning("%s is damaged (%s); resuming from %s, the newest whole checkpoint.", last, damage, candidate)
            return candidate
    raise CheckpointError(
        f"{last} is damaged ({damage}) and no other checkpoint in {checkpoint_dir} is whole: nothing to resume "
        "from; train again from the start in a new run dir (a SageMaker job: empty its checkpoint_s3_uri first)."
    )


def resume_overrides(run_dir: str | Path, given: Sequence[str]) -> list[str]:
    """The overrides that continue the run in ``run_dir``: its own, then ``given`` (which win), then its ``last.ckpt``.

    Hydra keeps a run's overrides in ``RUN_DIR/.hydra/overrides.yaml``; composing them again gives the
    run's config, and ``hydra.run.dir`` sends the continuation into the same directory.
    """
    run = Path(run_dir).expanduser().absolute()
    saved = run / ".hydra" / "overrides.yaml"
    if not saved.is_file():
        raise CheckpointError(
            f"resume={run_dir}: {saved} is missing; give a run directory that python -m dogbreed.train wrote "
            "(outputs/train/runs/<time>)."
        )
    parser = OverridesParser.create()
    replaced = {o.key_or_group for o in parser.parse_overrides(list(given))} | {"ckpt_path"}
    own = [o.input_line for o in parser.parse_overrides(list(OmegaConf.load(saved))) if o.key_or_group not in replaced]
    quoted = str(run).replace("\\", "\\\\").replace("'", "\\'")
    return [*own, *given, f"hydra.run.dir='{quoted}'", "ckpt_path=last"]


def train(cfg: DictConfig, extra_callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Fit, test with the best checkpoint, export ``model/`` and ``metrics.json``; return the metrics.

    Args:
        cfg: The composed ``conf/train.yaml``.
        extra_callbacks: Callbacks that callers add to the configured ones (a tuner's pruning callback).

    Returns:
        The test metrics, ``best_<monitor>`` of the checkpoint callback and ``objective``: the value of
        ``cfg.optimized_metric`` (what a tuner maximises).
    """
    resume_state = ResumeState()  # the run's clock, counting earlier processes of a resumed run
    ckpt_path = resume_state.ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.checkpoint_dir)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)

    log.info("Instantiating datamodule <%s>", cfg.data._target_)
    datamodule: DogBreedDataModule = instantiate(cfg.data)
    if cfg.data.get("num_classes") is None:
        datamodule.prepare_data()
        with open_dict(cfg):
            cfg.data.num_classes = datamodule.num_classes

    log.info("Instantiating model <%s>", cfg.model._target_)
    # the exported model records them for serving: refuse what it cannot rebuild in one line, before Hydra
    # builds the model (which would wrap the error in its own traceback)
    spec = cfg.model.get("backbone_kwargs")
    build_backbone_kwargs(OmegaConf.to_container(spec, resolve=True) if spec else {})
    model: DogBreedClassifier = instantiate(cfg.model)
    callbacks = [resume_state, *instantiate_group(cfg.get("callbacks"), "callback"), *extra_callbacks]
    loggers = instantiate_group(cfg.get("logger"), "logger")
    plugins = {}  # none given: trainer.plugins, if a config sets it, stays as it is
    if cfg.get("checkpoint_io"):
        log.info("Instantiating checkpoint_io <%s>", cfg.checkpoint_io._target_)
        plugins["plugins"] = [instantiate(cfg.checkpoint_io)]
    log.info("Instantiating trainer <%s>", cfg.trainer._target_)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **plugins)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    if cfg.get("train", True):
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    fit_metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    checkpoint = trainer.checkpoint_callback
    best_path = checkpoint.best_model_path if checkpoint else ""
    metrics: dict[str, Any] = dict(fit_metrics)
    if checkpoint and checkpoint.best_model_score is not None:
        metrics[f"best_{checkpoint.monitor}"] = float(checkpoint.best_model_score)

    if cfg.get("test", True):
        ckpt = best_path or (ckpt_path if not cfg.get("train", True) else None)
        if ckpt:
            share_checkpoint(trainer, ckpt)
        else:
            log.warning("No best checkpoint to test; testing the weights as they are.")
        test_metrics = trainer.test(model, datamodule=datamodule, ckpt_path=ckpt or None)[0]
        metrics.update(test_metrics)
        if trainer.is_global_zero:
            write_model_dir(
                cfg.paths.model_dir, model.net, backbone=model.hparams.backbone, stem=model.hparams.stem,
                backbone_kwargs=model.hparams.backbone_kwargs, test_time_flip=model.hparams.test_time_flip,
                class_names=datamodule.class_names, preprocessing=datamodule.preprocessing,
            )  # fmt: skip
            write_test_results(
                cfg.paths.output_dir, test_metrics, model.test_confusion, datamodule.class_names,
                best_checkpoint=best_path or None, epochs=trainer.current_epoch,
                wall_time_s=round(resume_state.wall_time_s, 1),
            )  # fmt: skip
            datamodule.write_report(cfg.paths.output_dir)  # which files this model never saw, and why
            log.info(
                "Model written to %s; test metrics in %s",
                cfg.paths.model_dir,
                Path(cfg.paths.output_dir) / METRICS,
            )

    report = None
    if cfg.get("report", False) and trainer.is_global_zero:
        report = report_run(cfg.paths.output_dir)
    if trainer.is_global_zero:
        for tracker in (logger for logger in loggers if isinstance(logger, MLflowRunLogger)):
            tracker.log_run_dir(cfg.paths.output_dir, cfg.paths.model_dir, data_digest=datamodule.index.digest())

    objective_key = cfg.get("optimized_metric")
    if objective_key:
        objective = metrics.get(f"best_{objective_key}", metrics.get(objective_key))
        metrics["objective"] = objective
    log.info("Done in %.1f s", resume_state.wall_time_s)
    if trainer.is_global_zero:  # where to look, and what a newcomer runs next
        run_dir = cfg.paths.output_dir
        log.info("Run dir: %s", run_dir)
        log.info("Report:  %s", report or f"none (build it with: dogbreed report {run_dir})")
        if cfg.get("test", True):
            log.info("Next:    dogbreed package %s -o model.tar.gz && dogbreed serve model.tar.gz", run_dir)
    return metrics


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def _run(cfg: DictConfig) -> float | None:
    """Hydra entry point; user errors end with one clear message instead of a traceback."""
    try:
        return train(cfg).get("objective")
    except (BackboneError, CheckpointError, DataError, WeightsError) as err:
        log.error("%s", err)
        sys.exit(2)
    except OSError as err:
        if not is_disk_full(err):
            raise
        log.error("%s", disk_full_message(err, cfg.paths.output_dir, cfg.paths.checkpoint_dir))
        sys.exit(2)


def disk_full_message(err: OSError, run_dir: str, checkpoint_dir: str) -> str:
    """One line for a run the disk filled up under: the path, the space needed and free, and the resume.

    A write other than a checkpoint's (a debugger record, the CSV log) knows no size; the run needs at
    least one more checkpoint's worth to go on, so the size of its ``last.ckpt`` stands in.
    """
    if not isinstance(err, DiskFullError):
        last = Path(checkpoint_dir) / LAST_CHECKPOINT
        err = DiskFullError(err.filename or run_dir, last.stat().st_size if last.is_file() else None)
    return (
        f"Training stopped: {err}. What was saved stays whole: free space there, then continue with: "
        f"python -m dogbreed.train resume={run_dir}"
    )


def main() -> float | None:
    """``python -m dogbreed.train [resume=RUN_DIR] [overrides]``: ``resume`` becomes the run's own overrides."""
    args = sys.argv[1:]
    resume = [a for a in args if a.startswith("resume=")]
    if resume:
        given = [a for a in args if "=" in a and not a.startswith("-") and a not in resume]
        flags = [a for a in args if a not in given and a not in resume]
        try:
            sys.argv = [sys.argv[0], *flags, *resume_overrides(resume[-1].removeprefix("resume="), given)]
        except CheckpointError as err:
            print(f"Error: {err}", file=sys.stderr)
            sys.exit(2)
    return _run()


if __name__ == "__main__":
    main()
