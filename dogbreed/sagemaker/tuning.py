"""Tuning jobs: SDK v3's ``HyperparameterTuner`` around the training job's ``ModelTrainer``, over ``hparams_search``.

The search space is the one the local Optuna tuner uses (:func:`dogbreed.config.search_space`). SageMaker scores
a job by the last value it printed of the objective metric, so the default objective is the best value so far
(``val/acc_best``): the epoch whose checkpoint the job tests and exports.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from dogbreed.models.classifier import BEST_MODES
from dogbreed.sagemaker.session import LaunchError

log = logging.getLogger(__name__)

STRATEGIES = ("Bayesian", "Random", "Hyperband", "Grid")


def hyperparameter_ranges(space: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """SageMaker parameter ranges from the checked search space (``log: true`` -> ``Logarithmic``)."""
    from sagemaker.core.parameter import CategoricalParameter, ContinuousParameter, IntegerParameter

    ranges: dict[str, Any] = {}
    for name, spec in space.items():
        scaling = "Logarithmic" if spec.get("log") else "Linear"
        if spec["type"] == "float":
            ranges[name] = ContinuousParameter(spec["low"], spec["high"], scaling_type=scaling)
        elif spec["type"] == "int":
            ranges[name] = IntegerParameter(spec["low"], spec["high"], scaling_type=scaling)
        else:
            ranges[name] = CategoricalParameter(list(spec["choices"]))
    return ranges


def objective_metric(metric: str | None, *, metrics: Sequence[str], direction: str) -> str:
    """``sagemaker.tuner.objective_metric``, checked against the metrics jobs print and the search direction."""
    if metric is None:
        raise LaunchError(
            "sagemaker.tuner.objective_metric is not set; add `objective_metric: ${optimized_metric}_best` under "
            "tuner in your conf/sagemaker file (see conf/sagemaker/default.yaml)."
        )
    if metric not in metrics:
        raise LaunchError(
            f"sagemaker.tuner.objective_metric={metric!r} is not in sagemaker.metrics {list(metrics)}, so no job "
            "would report it; add it there if training prints it, or set sagemaker.tuner.objective_metric to one "
            "of them."
        )
    base = metric.removesuffix("_best")
    mode = BEST_MODES.get(base) if base != metric else None
    if mode and mode != ("max" if direction == "maximize" else "min"):
        raise LaunchError(
            f"sagemaker.tuner.objective_metric={metric!r} is the running {mode} of {base}, but "
            f"hparams_search.direction={direction!r}; set the direction that fits {base}, or "
            f"sagemaker.tuner.objective_metric={base}."
        )
    return metric


def _isolated_tuner_class() -> type:
    from sagemaker.train.tuner import HyperparameterTuner

    class IsolatedTuner(HyperparameterTuner):
        """The SDK's tuner, keeping the trainer's network isolation in the jobs' definition (3.27 drops it)."""

        def _build_training_job_definition(self, inputs: Any) -> Any:
            definition = super()._build_training_job_definition(inputs)
            networking = self.model_trainer.networking
            if networking is not None and networking.enable_network_isolation is not None:
                definition.enable_network_isolation = networking.enable_network_isolation
            return definition

    return IsolatedTuner


def make_tuner(
    trainer: Any,
    *,
    space: Mapping[str, Mapping[str, Any]],
    objective: str,
    direction: str,
    metrics: Sequence[str],
    strategy: str,
    max_jobs: int,
    max_parallel_jobs: int,
    early_stopping: str,
    max_epochs: int,
    warm_start_parents: Sequence[str],
    warm_start_type: str,
    base_job_name: str,
    random_seed: int | None,
) -> Any:
    """A ``HyperparameterTuner`` over ``space`` whose jobs are ``trainer``'s job with the tuned values."""
    from sagemaker.core.shapes import (
        HyperbandStrategyConfig,
        HyperParameterTuningJobStrategyConfig,
        HyperParameterTuningJobWarmStartConfig,
        ParentHyperParameterTuningJob,
    )
    from sagemaker.train.tuner import WarmStartTypes

    from dogbreed.sagemaker.hyperparameters import metric_definitions

    if strategy not in STRATEGIES:
        raise LaunchError(f"sagemaker.tuner.strategy={strategy!r}; choose from {STRATEGIES}.")
    if strategy == "Grid" and any(spec["type"] != "categorical" for spec in space.values()):
        raise LaunchError(
            "sagemaker.tuner.strategy=Grid needs categorical parameters only; give every hparams_search.params "
            "entry a choices list, or pick Bayesian, Random or Hyperband."
        )
    strategy_config = None
    if strategy == "Hyperband":
        # Hyperband stops jobs itself from the per-epoch objective; SageMaker requires early stopping Off. Each
        # printed objective value is an intermediate result (one per validated epoch). The best value so far is
        # fine for it: it compares jobs at equal epochs, and a job's value after r epochs is then its best epoch
        # up to r, the measure the final ranking uses (Auto early stopping's running medians likewise).
        strategy_config = HyperParameterTuningJobStrategyConfig(
            hyperband_strategy_config=HyperbandStrategyConfig(min_resource=1, max_resource=max_epochs)
        )
        early_stopping = "Off"
    warm_start = None
    if warm_start_parents:
        warm_start = HyperParameterTuningJobWarmStartConfig(
            parent_hyper_parameter_tuning_jobs=[
                ParentHyperParameterTuningJob(hyper_parameter_tuning_job_name=name) for name in warm_start_parents
            ],
            warm_start_type=WarmStartTypes(warm_start_type).value,
        )
    return _isolated_tuner_class()(
        trainer,
        objective_metric_name=objective,
        hyperparameter_ranges=hyperparameter_ranges(space),
        metric_definitions=metric_definitions(metrics),
        strategy=strategy,
        objective_type="Maximize" if direction == "maximize" else "Minimize",
        max_jobs=None if strategy == "Grid" else max_jobs,
        max_parallel_jobs=max_parallel_jobs,
        early_stopping_type=early_stopping,
        strategy_config=strategy_config,
        warm_start_config=warm_start,
        base_tuning_job_name=base_job_name,
        random_seed=random_seed,
    )


def launch_tune(tuner: Any, inputs: Sequence[Any], *, wait: bool) -> str:
    """Submit the tuning job; return its name."""
    tuner.tune(inputs=list(inputs), wait=wait)
    name = tuner.latest_tuning_job.hyper_parameter_tuning_job_name
    log.info(
        "Tuning job %s submitted; afterwards: dogbreed-sagemaker analytics sagemaker.analytics.tuning_job=%s",
        name,
        name,
    )
    return name
