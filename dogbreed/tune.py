"""Local hyperparameter search: ``python -m dogbreed.tune [overrides]``, an Optuna study around ``train(cfg)``.

The search space is ``cfg.hparams_search`` (``conf/hparams_search/``), the same file the SageMaker tuner
reads. Each trial is one ``train(cfg)`` run in ``<run dir>/trials/<n>/``; a pruning callback reports the
objective after every validation epoch so that the pruner can stop bad trials early. The study lives in
``tune.storage`` (SQLite in the run dir by default; :mod:`dogbreed.study_storage` says which to pick):
re-running the command resumes it, and several processes (a journal file) or machines (PostgreSQL) can
share one storage to run trials in parallel.

Run dir: ``study.db``, ``study.json``, ``trials.csv``, ``best_overrides.txt``, ``tuned/best.yaml``, ``plots/*.png``
and ``report/tuning-report.html``.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import shutil
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import optuna
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from dogbreed import rundir, tracking
from dogbreed.config import CONFIG_DIR, TuneConfigError, search_space
from dogbreed.data import DataError
from dogbreed.models import WeightsError
from dogbreed.report.tuning import readable_parallel_coordinate, report_tuning
from dogbreed.rundir import BEST_OVERRIDES, MODEL_DIR, PLOT_DIR, STUDY_JSON, TRIAL_COLUMNS, TRIALS_CSV
from dogbreed.study_storage import fail_stale_trials, make_storage, trial_heartbeat
from dogbreed.train import train

log = logging.getLogger(__name__)

EPOCHS_ATTR = "epochs"
BEST_CONFIG = Path("tuned") / "best.yaml"
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "asha", "hyperband", "none")


def suggest(trial: optuna.Trial, params: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Sample one value per parameter of the search space."""
    values: dict[str, Any] = {}
    for name, spec in params.items():
        if spec["type"] == "float":
            values[name] = trial.suggest_float(name, spec["low"], spec["high"], log=bool(spec.get("log")))
        elif spec["type"] == "int":
            values[name] = trial.suggest_int(name, spec["low"], spec["high"], log=bool(spec.get("log")))
        else:
            values[name] = trial.suggest_categorical(name, list(spec["choices"]))
    return values


class OptunaPruning(Callback):
    """Report the monitored metric to the trial after each validation epoch; stop the trial if pruned.

    The step reported is the number of epochs done, the resource the pruners' ``min_resource`` and
    ``n_warmup_steps`` count in. Also records it as the ``epochs`` user attribute, for the results table.
    """

    def __init__(self, trial: optuna.Trial, monitor: str) -> None:
        self.trial = trial
        self.monitor = monitor

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            raise KeyError(
                f"optimized_metric={self.monitor!r} was not logged; logged: {sorted(trainer.callback_metrics)}."
            )
        epochs = trainer.current_epoch + 1
        self.trial.set_user_attr(EPOCHS_ATTR, epochs)
        self.trial.report(float(value), step=epochs)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned after {epochs} epoch(s) with {self.monitor}={float(value):.4f}")


def make_sampler(name: str, *, seed: int | None, n_startup_trials: int) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        # constant_liar keeps parallel workers from sampling the same point
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup_trials, constant_liar=True)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise TuneConfigError(f"tune.sampler={name!r} is not supported; use one of {SAMPLERS}.")


def make_pruner(
    name: str, *, n_startup_trials: int, n_warmup_steps: int, max_epochs: int, reduction_factor: int = 3
) -> optuna.pruners.BasePruner:
    """The pruner named by ``tune.pruner``; resources are epochs, from 1 to ``trainer.max_epochs``.

    ``asha`` (asynchronous successive halving) lets a trial past 1, η, η², ... epochs only while it is in
    the best 1/η of the trials that reached that point, so most trials stop after one epoch;
    ``hyperband`` runs several such brackets with different first stops; ``median`` stops a trial below
    the median of earlier trials at the same epoch once ``n_startup_trials`` have finished.
    """
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=n_startup_trials, n_warmup_steps=n_warmup_steps)
    if name == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=reduction_factor)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=1, max_resource=max_epochs, reduction_factor=reduction_factor
        )
    if name == "none":
        return optuna.pruners.NopPruner()
    raise TuneConfigError(f"tune.pruner={name!r} is not supported; use one of {PRUNERS}.")


def trial_config(
    cfg: DictConfig, values: Mapping[str, Any], trial_dir: Path, *, mlflow_parent: str | None = None
) -> DictConfig:
    """The training config of one trial: the sampled values applied, writing under ``trial_dir``; with MLflow
    tracking on, its run nested under the study's run ``mlflow_parent``."""
    trial_cfg = cfg.copy()
    with open_dict(trial_cfg):
        if mlflow_parent:
            trial_cfg.logger.mlflow.parent_run_id = mlflow_parent
            trial_cfg.logger.mlflow.run_name = f"{cfg.tune.study_name} trial {trial_dir.name}"
        for key, value in values.items():
            OmegaConf.update(trial_cfg, key, value, merge=False)
        trial_cfg.paths.output_dir = str(trial_dir)
        trial_cfg.paths.model_dir = str(trial_dir / MODEL_DIR)
        trial_cfg.test = bool(cfg.tune.test_trials)
        if cfg.tune.n_jobs != 1:  # progress bars of concurrent trials would fight over one terminal
            trial_cfg.trainer.enable_progress_bar = False
            trial_cfg.get("callbacks", {}).pop("progress_bar", None)
        trial_cfg.pop("tune", None)
        trial_cfg.pop("hparams_search", None)
    return trial_cfg


def make_objective(
    cfg: DictConfig, out_dir: Path, run: Callable[..., dict[str, Any]] = train, *, mlflow_parent: str | None = None
) -> Callable[[optuna.Trial], float]:
    """The function Optuna calls per trial: sample, train with the pruning callback, return the objective."""
    params = search_space(cfg)

    def objective(trial: optuna.Trial) -> float:
        values = suggest(trial, params)
        trial_dir = rundir.trial_dir(out_dir, trial.number)
        log.info("Trial %d: %s", trial.number, " ".join(f"{k}={v}" for k, v in values.items()))
        try:
            pruning = OptunaPruning(trial, cfg.optimized_metric)
            trial_cfg = trial_config(cfg, values, trial_dir, mlflow_parent=mlflow_parent)
            with trial_heartbeat(trial, cfg.tune.heartbeat_interval):
                metrics = run(trial_cfg, extra_callbacks=[pruning])
        finally:
            if not cfg.tune.keep_checkpoints:
                shutil.rmtree(trial_dir / "checkpoints", ignore_errors=True)
        value = metrics.get("objective")
        if value is None:
            raise RuntimeError(f"trial {trial.number} returned no objective; is optimized_metric set?")
        return float(value)

    return objective


def open_study(cfg: DictConfig, out_dir: Path) -> optuna.Study:
    """Create the study, or load it when the storage already holds one of this name (resume)."""
    tune_cfg = cfg.tune
    url = tune_cfg.storage or f"sqlite:///{(out_dir / 'study.db').resolve()}"
    storage = make_storage(url, heartbeat_interval=tune_cfg.heartbeat_interval, grace_period=tune_cfg.grace_period)
    study = optuna.create_study(
        study_name=tune_cfg.study_name,
        storage=storage,
        direction=cfg.hparams_search.direction,
        sampler=make_sampler(tune_cfg.sampler, seed=tune_cfg.seed, n_startup_trials=tune_cfg.n_startup_trials),
        pruner=make_pruner(
            tune_cfg.pruner,
            n_startup_trials=tune_cfg.n_startup_trials,
            n_warmup_steps=tune_cfg.n_warmup_steps,
            max_epochs=cfg.trainer.max_epochs,
            reduction_factor=tune_cfg.reduction_factor,
        ),
        load_if_exists=True,
    )
    done = finished_trials(study)
    if done:
        log.info("Resuming study %r from %s: %d trials finished", study.study_name, url, len(done))
    return study


def finished_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return study.get_trials(deepcopy=False, states=states)


def tune(cfg: DictConfig, run: Callable[..., dict[str, Any]] = train) -> optuna.Study:
    """Run trials until ``tune.n_trials`` have finished (counting earlier runs) or ``tune.timeout``; write results.

    Args:
        cfg: The composed ``conf/tune.yaml``.
        run: The training function (``train``); tests pass a wrapper.
    """
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    study = open_study(cfg, out_dir)
    fail_stale_trials(study, cfg.tune.grace_period)
    remaining = cfg.tune.n_trials - len(finished_trials(study))
    if remaining > 0:
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        callbacks: list[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]] = [
            optuna.study.MaxTrialsCallback(cfg.tune.n_trials, states=states),
            lambda study, _: fail_stale_trials(study, cfg.tune.grace_period),
        ]
        mlflow_parent = None
        if mlflow_cfg := cfg.get("logger", {}).get("mlflow"):  # logger=mlflow: a parent run, a child per trial
            settings = {key: OmegaConf.to_container(cfg[key], resolve=True) for key in ("tune", "hparams_search")}
            mlflow_parent = tracking.study_parent_run(
                study, experiment_name=mlflow_cfg.experiment_name, tracking_uri=mlflow_cfg.tracking_uri,
                params={**settings, "optimized_metric": cfg.optimized_metric},
            )  # fmt: skip
            callbacks.append(
                functools.partial(tracking.record_trial, tracking_uri=mlflow_cfg.tracking_uri, tune_dir=out_dir)
            )
        study.optimize(
            make_objective(cfg, out_dir, run, mlflow_parent=mlflow_parent),
            n_trials=remaining,
            timeout=cfg.tune.timeout,
            n_jobs=cfg.tune.n_jobs,
            callbacks=callbacks,
            gc_after_trial=True,
        )
    write_results(study, out_dir, base_overrides=user_overrides(), metric=cfg.optimized_metric)
    return study


def user_overrides() -> list[str]:
    """The command line's training overrides, to repeat in the best config (not tuning settings or paths)."""
    if not HydraConfig.initialized():
        return []
    skip = ("tune", "hparams_search", "paths")
    return [o for o in HydraConfig.get().overrides.task if o.lstrip("+~").split("=")[0].split(".")[0] not in skip]


def write_results(
    study: optuna.Study, out_dir: Path, base_overrides: Sequence[str] = (), metric: str | None = None
) -> None:
    """``trials.csv`` and ``study.json``; once a trial completed, the best configuration and ``plots/``; the report.

    Args:
        study: The study, after its trials.
        out_dir: The tuning run dir.
        base_overrides: The command line's training overrides, repeated in the final-run command.
        metric: The objective's name (``optimized_metric``), for the report.
    """
    write_trials_csv(study, out_dir / TRIALS_CSV)
    write_study_json(study, out_dir / STUDY_JSON, metric=metric)
    if study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        write_best(study, out_dir, base_overrides)
        write_plots(study, out_dir / PLOT_DIR)
    else:
        log.warning("No trial completed yet; no best configuration to write.")
    report_tuning(out_dir)


def write_study_json(study: optuna.Study, path: Path, *, metric: str | None) -> None:
    """What the report needs to know of the study beyond trials.csv: report/ reads files, never the study."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    best = study.best_trial if complete else None
    summary = {
        "study_name": study.study_name,
        "direction": study.direction.name.lower(),
        "metric": metric,
        "best_trial": best.number if best else None,
        "best_value": best.value if best else None,
    }
    path.write_text(json.dumps(summary, indent=2) + "\n")


def write_best(study: optuna.Study, out_dir: Path, base_overrides: Sequence[str]) -> None:
    """``best_overrides.txt`` and ``tuned/best.yaml``: the best trial's values, ready for the final run."""
    best = study.best_trial
    params = {k: best.params[k] for k in sorted(best.params)}
    overrides = [o for o in base_overrides if o.split("=", 1)[0].lstrip("+~") not in params]
    overrides += [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in params.items()]
    (out_dir / BEST_OVERRIDES).write_text("\n".join(overrides) + "\n")
    best_cfg = OmegaConf.create()
    for key, value in params.items():
        OmegaConf.update(best_cfg, key, value, force_add=True)
    header = (
        f"# @package _global_\n# Best of study {study.study_name!r}: trial {best.number}, objective {best.value:.6g}.\n"
        f"# python -m dogbreed.train -cd {out_dir} +tuned=best {' '.join(base_overrides)}\n"
    )
    (out_dir / BEST_CONFIG).parent.mkdir(parents=True, exist_ok=True)
    (out_dir / BEST_CONFIG).write_text(header + OmegaConf.to_yaml(best_cfg))
    log.info(
        "Best trial %d: objective %.4f with %s\nFinal run: python -m dogbreed.train %s",
        best.number, best.value, params, " ".join(overrides),
    )  # fmt: skip


def write_trials_csv(study: optuna.Study, path: Path) -> None:
    """One row per trial: trial, state, objective, epochs run, duration, then each parameter.

    A pruned trial's objective is the last value it reported (Optuna stores it): how far it got.
    """
    trials = study.get_trials(deepcopy=False)
    names = sorted({k for t in trials for k in t.params})
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*TRIAL_COLUMNS, *names])
        for t in trials:
            duration = t.duration.total_seconds() if t.duration else None
            writer.writerow(
                [t.number, t.state.name, t.value, t.user_attrs.get(EPOCHS_ATTR, 0), duration]
                + [t.params.get(k) for k in names]
            )


def write_plots(study: optuna.Study, plot_dir: Path) -> None:
    """Optimisation history, parameter importance and parallel coordinates as PNGs (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    plot_dir.mkdir(parents=True, exist_ok=True)
    plots = {
        "optimization_history": ovm.plot_optimization_history,
        "param_importances": ovm.plot_param_importances,
        "parallel_coordinate": lambda s: readable_parallel_coordinate(ovm.plot_parallel_coordinate(s)),
    }
    for name, plot in plots.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # experimental-API and degenerate-axis warnings from small studies
            try:
                ax = plot(study)
            except (ValueError, RuntimeError, ZeroDivisionError) as err:  # e.g. importance needs 2+ trials
                log.warning("Skipped plot %s: %s", name, err)
                continue
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.savefig(plot_dir / f"{name}.png", dpi=100, bbox_inches="tight")
        plt.close(fig)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="tune")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; user errors end with one clear message instead of a traceback."""
    try:
        study = tune(cfg)
    except (DataError, WeightsError, TuneConfigError) as err:
        log.error("%s", err)
        sys.exit(2)
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return study.best_value if complete else None


if __name__ == "__main__":
    main()
