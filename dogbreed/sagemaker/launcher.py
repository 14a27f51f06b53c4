"""``dogbreed-sagemaker {train,tune,deploy,transform,analytics}``: compose the configs, hand each verb its settings.

``conf/launch_sagemaker.yaml`` = the training config + the search space + ``conf/sagemaker/``. Overrides of
``sagemaker.*``, ``tune.*`` and ``hparams_search`` configure the launcher; every other override becomes a job
hyperparameter that the container's entry point (:mod:`dogbreed.sagemaker.entry`) turns back into the same Hydra
override, so the job trains exactly what ``python -m dogbreed.train <overrides>`` would.

This is the one module that reads the config; the verbs (:mod:`~dogbreed.sagemaker.training`,
:mod:`~dogbreed.sagemaker.tuning`, :mod:`~dogbreed.sagemaker.deployment`, :mod:`~dogbreed.sagemaker.transform`,
:mod:`~dogbreed.sagemaker.analytics`) take keyword arguments. SageMaker Python SDK v3; the last dogbreed commit on
SDK v2 is named in the README.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dogbreed.config import compose_config, search_space
from dogbreed.sagemaker import inputs, training
from dogbreed.sagemaker.inputs import source_dir
from dogbreed.sagemaker.session import LaunchError, make_session

__all__ = ["COMMANDS", "LaunchError", "compose_launch_config", "launch", "source_dir", "split_overrides"]

COMMANDS = ("train", "tune", "deploy", "transform", "analytics")
LAUNCHER_KEYS = ("sagemaker", "tune", "hparams_search")


def split_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(launcher overrides, job overrides)``: ``sagemaker.*``/``tune.*``/``hparams_search`` stay local."""
    local, job = [], []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        (local if key.split(".", 1)[0] in LAUNCHER_KEYS else job).append(override)
    return local, job


def compose_launch_config(overrides: Sequence[str]) -> DictConfig:
    """``conf/launch_sagemaker.yaml`` with all overrides (the launcher reads the job's config too)."""
    return compose_config("launch_sagemaker", overrides)


def required(sm: DictConfig, key: str) -> Any:
    """``sagemaker.<key>``, which has no usable default."""
    if OmegaConf.is_missing(sm, key):
        raise LaunchError(f"sagemaker.{key} is not set; pass sagemaker.{key}=... or set it in conf/sagemaker/.")
    return sm[key]


def session_for(sm: DictConfig) -> Any:
    return make_session(region=sm.region, bucket=required(sm, "bucket"), telemetry_opt_out=bool(sm.telemetry_opt_out))


def job_inputs(cfg: DictConfig, session: Any) -> list[Any]:
    """The ``code``, ``training`` and ``weights`` channels, uploading what is local."""
    sm = cfg.sagemaker
    isolated = bool(sm.network_isolation)
    data = inputs.data_uri(
        source=str(cfg.data.source), data_s3_uri=sm.data_s3_uri, bucket=sm.bucket, prefix=sm.prefix,
        network_isolation=isolated,
    )  # fmt: skip
    weights = cfg.model.get("weights")
    weights = inputs.weights_uri(
        session, weights=None if weights is None else str(weights), weights_s3_uri=sm.weights_s3_uri,
        bucket=sm.bucket, prefix=sm.prefix, network_isolation=isolated,
    )  # fmt: skip
    extras = ["mlflow"] if sm.mlflow.tracking_arn else []
    code = inputs.upload_source(session, code_s3_uri=sm.code_s3_uri, base_job_name=sm.base_job_name, extras=extras)
    return inputs.channels(code=code, data=data, weights=weights)


def with_tracking(cfg: DictConfig, job_overrides: Sequence[str]) -> list[str]:
    """``job_overrides`` plus, with ``sagemaker.mlflow.tracking_arn`` set, ``logger=mlflow`` (unless a logger is
    chosen, which must then hold the MLflow logger) and the experiment's name."""
    sm, overrides = cfg.sagemaker, list(job_overrides)
    if not sm.mlflow.tracking_arn:
        return overrides
    chosen = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == "logger"]
    if not chosen:
        overrides.append("logger=mlflow")
    elif "mlflow" not in (cfg.get("logger") or {}):
        raise LaunchError(
            f"sagemaker.mlflow.tracking_arn is set but logger={chosen[-1]} has no MLflow logger: drop the logger "
            "override (the job then uses logger=mlflow), or choose logger=mlflow or logger=many."
        )
    return [*overrides, f"logger.mlflow.experiment_name={sm.mlflow.experiment_name}"]


def make_trainer(cfg: DictConfig, session: Any, job_overrides: Sequence[str], *, checkpoints: bool) -> Any:
    """The training job's ``ModelTrainer`` from ``cfg.sagemaker``, running ``job_overrides``."""
    sm = cfg.sagemaker
    image = training.training_image(
        region=sm.region, instance_type=sm.instance_type, framework_version=sm.framework_version,
        py_version=sm.py_version, image_uri=sm.image_uri,
    )  # fmt: skip
    environment: dict[str, str] = {}
    if sm.mlflow.tracking_arn:
        environment, fields = training.mlflow_tracking(
            tracking_arn=sm.mlflow.tracking_arn, experiment_name=sm.mlflow.experiment_name
        )
        training.add_to_training_job_requests(session, fields)
    overrides = with_tracking(cfg, job_overrides)
    return training.make_trainer(
        session,
        hyperparameters=training.job_hyperparameters(overrides, instance_count=sm.instance_count, region=sm.region),
        environment=environment,
        image=image,
        role=required(sm, "role"),
        instance_type=sm.instance_type,
        instance_count=sm.instance_count,
        volume_size=sm.volume_size,
        max_run=sm.max_run,
        spot=bool(sm.spot),
        max_wait=sm.max_wait,
        checkpoint_s3_uri=sm.checkpoint_s3_uri if checkpoints else None,
        network_isolation=bool(sm.network_isolation),
        metrics=list(sm.metrics),
        base_job_name=sm.base_job_name,
        output_s3_uri=sm.output_s3_uri,
    )


def sagemaker_rules(cfg: DictConfig) -> dict[str, Any]:
    """The opt-in SageMaker-side rules of ``sagemaker.profiler`` / ``sagemaker.debugger``, with the local thresholds."""
    sm = cfg.sagemaker
    rule_settings = OmegaConf.select(cfg, "callbacks.debugger.rules")
    return training.sagemaker_rules(
        region=sm.region,
        output_s3_uri=sm.output_s3_uri,
        profiler=bool(sm.profiler.enabled),
        system_monitor_interval_millis=sm.profiler.system_monitor_interval_millis,
        profiler_rules=list(sm.profiler.rules),
        debugger=bool(sm.debugger.enabled),
        debugger_rules=list(sm.debugger.rules),
        collections=list(sm.debugger.collections),
        save_interval=sm.debugger.save_interval,
        rule_settings=OmegaConf.to_container(rule_settings, resolve=True) if rule_settings is not None else {},
    )


def launch_train(cfg: DictConfig, job_overrides: Sequence[str], session: Any | None = None) -> str:
    """Submit a training job; return its name."""
    sm = cfg.sagemaker
    required(sm, "role")  # before uploading anything
    session = session or session_for(sm)
    rules = sagemaker_rules(cfg)
    trainer = make_trainer(cfg, session, job_overrides, checkpoints=bool(sm.spot or sm.always_checkpoint))
    if rules:
        training.add_to_training_job_requests(session, rules)
    return training.launch_train(trainer, job_inputs(cfg, session), wait=bool(sm.wait))


def make_tuner(cfg: DictConfig, trainer: Any) -> Any:
    """The ``HyperparameterTuner`` of ``cfg.sagemaker.tuner`` over ``hparams_search`` around ``trainer``."""
    from dogbreed.sagemaker import tuning

    sm, tc = cfg.sagemaker, cfg.sagemaker.tuner
    direction = cfg.hparams_search.direction
    return tuning.make_tuner(
        trainer,
        space=search_space(cfg),
        objective=tuning.objective_metric(tc.get("objective_metric"), metrics=list(sm.metrics), direction=direction),
        direction=direction,
        metrics=list(sm.metrics),
        strategy=tc.strategy,
        max_jobs=tc.max_jobs,
        max_parallel_jobs=tc.max_parallel_jobs,
        early_stopping=tc.early_stopping,
        max_epochs=cfg.trainer.max_epochs,
        warm_start_parents=list(tc.warm_start_parents),
        warm_start_type=tc.warm_start_type,
        base_job_name=sm.base_job_name,
        random_seed=tc.random_seed,
    )


def launch_tune(cfg: DictConfig, job_overrides: Sequence[str], session: Any | None = None) -> str:
    """Submit a tuning job over ``hparams_search``; return its name.

    Its jobs run without SageMaker-side rules (a tuning job's training definition has no place for them); the
    in-job rules and reports run in every trial.
    """
    from dogbreed.sagemaker import tuning

    sm = cfg.sagemaker
    required(sm, "role")  # before uploading anything
    session = session or session_for(sm)
    tuned = set(cfg.hparams_search.params)
    static = [o for o in job_overrides if o.split("=", 1)[0].lstrip("+~") not in tuned]
    trainer = make_trainer(cfg, session, static, checkpoints=bool(sm.spot or sm.always_checkpoint))
    return tuning.launch_tune(make_tuner(cfg, trainer), job_inputs(cfg, session), wait=bool(sm.wait))


def served_model(cfg: DictConfig, session: Any) -> Any:
    """The model ``sagemaker.deploy`` names (a training job's or an S3 ``model.tar.gz``), for deploy and transform."""
    from dogbreed.sagemaker import deployment

    sm, dc = cfg.sagemaker, cfg.sagemaker.deploy
    role = required(sm, "role")
    return deployment.ServedModel(
        model_data=deployment.model_data_of(session, training_job=dc.training_job, model_data=dc.model_data),
        role=role,
        image_uri=dc.image_uri,
        network_isolation=bool(sm.network_isolation),
        framework_version=str(dc.framework_version),
        py_version=dc.py_version,
    )


def deploy(cfg: DictConfig, session: Any | None = None) -> str:
    """Deploy a training job's ``model.tar.gz`` behind an endpoint; return its name."""
    from dogbreed.sagemaker import deployment

    sm, dc = cfg.sagemaker, cfg.sagemaker.deploy
    session = session or session_for(sm)
    return deployment.deploy(
        session,
        served_model(cfg, session),
        instance_type=dc.instance_type,
        initial_instance_count=dc.initial_instance_count,
        endpoint_name=dc.endpoint_name,
        base_name=sm.base_job_name,
        prefix=sm.prefix,
        wait=bool(sm.wait),
    )


def transform(cfg: DictConfig, session: Any | None = None) -> str:
    """Batch Transform over ``sagemaker.transform.input`` with the model ``deploy`` serves; return the job's name."""
    from dogbreed.sagemaker.transform import transform as transform_job

    sm, tc = cfg.sagemaker, cfg.sagemaker.transform
    required(sm, "role")
    if not tc.input:
        raise LaunchError("sagemaker.transform.input is not set; pass sagemaker.transform.input=s3://bucket/prefix.")
    session = session or session_for(sm)
    return transform_job(
        session,
        served_model(cfg, session),
        input_s3_uri=tc.input,
        output_s3_uri=tc.output,
        instance_type=tc.instance_type,
        instance_count=tc.instance_count,
        content_type=tc.content_type,
        split_type=str(tc.split_type),
        accept=tc.accept,
        max_payload_mb=tc.max_payload_mb,
        max_concurrent_transforms=tc.max_concurrent_transforms,
        job_name=tc.job_name,
        base_name=sm.base_job_name,
        bucket=sm.bucket,
        prefix=sm.prefix,
        wait=bool(sm.wait),
    )


def analytics(cfg: DictConfig, session: Any | None = None) -> Path:
    """Save the tuning job's per-job table as CSV and plot the objective against each hyperparameter."""
    from dogbreed.sagemaker.analytics import analytics as tuning_analytics

    sm = cfg.sagemaker
    return tuning_analytics(
        session or session_for(sm), tuning_job=sm.analytics.tuning_job, params=list(cfg.hparams_search.params),
        output_dir=sm.analytics.output_dir,
    )  # fmt: skip


def launch(argv: Sequence[str]) -> str | Path:
    """``dogbreed-sagemaker COMMAND [overrides]``: compose the config, run the command, return its result."""
    if not argv or argv[0] not in COMMANDS:
        raise LaunchError(f"usage: dogbreed-sagemaker {{{','.join(COMMANDS)}}} [hydra overrides]")
    command, overrides = argv[0], list(argv[1:])
    _, job_overrides = split_overrides(overrides)
    cfg = compose_launch_config(overrides)
    if command == "train":
        return launch_train(cfg, job_overrides)
    if command == "tune":
        return launch_tune(cfg, job_overrides)
    if command == "deploy":
        return deploy(cfg)
    if command == "transform":
        return transform(cfg)
    return analytics(cfg)
