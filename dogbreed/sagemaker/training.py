"""Training jobs: a ``ModelTrainer`` (SageMaker Python SDK v3) whose container runs ``dogbreed.train``.

The job runs in script mode of the PyTorch training image: the image's own training toolkit unpacks
``sourcedir.tar.gz`` (the ``code`` channel), pip-installs its ``requirements.txt`` and runs ``dogbreed_entry.py``
(:mod:`dogbreed.sagemaker.entry`) with the job's hyperparameters, which are the user's Hydra overrides. The
trainer gets no ``SourceCode``: the SDK's own drivers would replace the toolkit, and they export each
hyperparameter as a shell variable (``SM_HP_MODEL.LR``), which bash rejects, so every job with a dotted
override (all of dogbreed's) would fail before training.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from dogbreed.sagemaker.entry import ENTRY_SCRIPT
from dogbreed.sagemaker.hyperparameters import metric_definitions, overrides_to_hyperparameters
from dogbreed.sagemaker.inputs import CODE_CHANNEL, SOURCEDIR, requirements
from dogbreed.sagemaker.session import LaunchError

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "/opt/ml/checkpoints"


def training_image(
    *, region: str, instance_type: str, framework_version: str | None, py_version: str | None, image_uri: str | None
) -> str:
    """``image_uri``, or the PyTorch training image of ``framework_version`` (None: the newest the SDK knows).

    The SDK's image config lists every released PyTorch training image; ``py_version`` None takes the newest
    Python that image has. CPU or GPU follows ``instance_type``.
    """
    if image_uri:
        return image_uri
    from packaging.version import Version
    from sagemaker.core import image_uris

    version = framework_version or max(image_uris.list_versions("pytorch", "training"), key=Version)
    try:
        py_version = py_version or max(
            image_uris.list_py_versions("pytorch", version, "training"), key=lambda v: int(v.removeprefix("py"))
        )
        return image_uris.retrieve(
            "pytorch", region=region, version=version, py_version=py_version, instance_type=instance_type,
            image_scope="training",
        )  # fmt: skip
    except ValueError as err:
        raise LaunchError(
            f"no PyTorch training image for sagemaker.framework_version={version}, py_version={py_version} in "
            f"{region}: {err}; pick a listed version, or set sagemaker.image_uri."
        ) from None


def job_hyperparameters(job_overrides: Sequence[str], *, instance_count: int, region: str) -> dict[str, str]:
    """The job's hyperparameters: the overrides, and the training toolkit's ``sagemaker_*`` keys.

    Values are JSON-encoded as the toolkit expects them (``"\\"demo\\""``); the entry point decodes them back to
    the strings the user typed. More than one instance trains data-parallel: the toolkit's ``torch_distributed``
    launcher (torchrun) sets the environment Lightning's DDP reads, with ``trainer=ddp`` over every node.
    """
    hyperparameters: dict[str, Any] = overrides_to_hyperparameters(job_overrides)
    if instance_count > 1:
        hyperparameters.setdefault("trainer", "ddp")
        hyperparameters["trainer.num_nodes"] = str(instance_count)
        hyperparameters["sagemaker_torch_distributed_enabled"] = True
    hyperparameters |= {
        "sagemaker_program": ENTRY_SCRIPT,
        "sagemaker_submit_directory": f"/opt/ml/input/data/{CODE_CHANNEL}/{SOURCEDIR}",
        "sagemaker_container_log_level": logging.INFO,
        "sagemaker_region": region,
    }
    return {key: json.dumps(value) for key, value in hyperparameters.items()}


def make_trainer(
    session: Any,
    *,
    hyperparameters: Mapping[str, str],
    image: str,
    role: str,
    instance_type: str,
    instance_count: int,
    volume_size: int,
    max_run: int,
    spot: bool,
    max_wait: int | None,
    checkpoint_s3_uri: str | None,
    network_isolation: bool,
    metrics: Sequence[str],
    base_job_name: str,
    output_s3_uri: str,
    environment: Mapping[str, str] | None = None,
) -> Any:
    """A ``ModelTrainer`` for one training job (or the template of a tuning job's jobs).

    Spot jobs wait up to ``max_wait`` seconds (None: ``2 * max_run``) for capacity; ``checkpoint_s3_uri`` syncs
    with ``/opt/ml/checkpoints``, from which a restarted job resumes. ``environment`` is the container's (the
    tuner copies it into its jobs' definition).
    """
    from sagemaker.core.shapes import CheckpointConfig, OutputDataConfig
    from sagemaker.core.training.configs import Compute, MetricDefinition, Networking, StoppingCondition
    from sagemaker.train import ModelTrainer

    if network_isolation and "pytorch-training" in image:
        log.warning(
            "Network isolation: the container cannot pip install requirements.txt (%s); use an image that has "
            "them (sagemaker.image_uri).",
            ", ".join(requirements()),
        )
    trainer = ModelTrainer(
        sagemaker_session=session,
        role=role,
        base_job_name=base_job_name,
        training_image=image,
        hyperparameters=dict(hyperparameters),
        environment=dict(environment or {}),
        compute=Compute(
            instance_type=instance_type,
            instance_count=instance_count,
            volume_size_in_gb=volume_size,
            enable_managed_spot_training=spot,
        ),
        stopping_condition=StoppingCondition(
            max_runtime_in_seconds=max_run, max_wait_time_in_seconds=(max_wait or 2 * max_run) if spot else None
        ),
        checkpoint_config=(
            CheckpointConfig(s3_uri=checkpoint_s3_uri, local_path=CHECKPOINT_DIR) if checkpoint_s3_uri else None
        ),
        networking=Networking(enable_network_isolation=network_isolation),
        output_data_config=OutputDataConfig(s3_output_path=output_s3_uri),
    )
    definitions = metric_definitions(metrics)
    return trainer.with_metric_definitions([MetricDefinition(name=d["Name"], regex=d["Regex"]) for d in definitions])


def sagemaker_rules(
    *,
    region: str,
    output_s3_uri: str,
    profiler: bool,
    system_monitor_interval_millis: int,
    profiler_rules: Sequence[str],
    debugger: bool,
    debugger_rules: Sequence[str],
    collections: Sequence[str],
    save_interval: int,
    rule_settings: Mapping[str, Any],
) -> dict[str, Any]:
    """CreateTrainingJob fields for SageMaker-side profiler and debugger rules (both opt-in), ``{}`` when off.

    SageMaker Debugger takes no new customers since 2026-07-30 and its profiler ends 2027-06-30; the in-job
    rules of :mod:`dogbreed.callbacks` run in every job whatever is set here. ``rule_settings`` are the local
    debugger's per-rule parameters (``callbacks.debugger.rules``), so both run the same thresholds; a rule set to
    ``false`` there is left out here too.
    """
    from sagemaker.core.debugger import (
        CollectionConfig,
        DebuggerHookConfig,
        ProfilerConfig,
        ProfilerRule,
        Rule,
        get_rule_container_image_uri,
        rule_configs,
    )

    def built_in(name: str) -> Any:
        if not hasattr(rule_configs, name):
            known = sorted(n for n in dir(rule_configs) if not n.startswith("_"))
            raise LaunchError(f"sagemaker.debugger rule {name!r} is not a built-in rule; choose from {known}.")
        return getattr(rule_configs, name)()

    def request(rule: Any, to_dict: str) -> dict[str, Any]:
        rule.image_uri = get_rule_container_image_uri(rule.name, region)
        return getattr(rule, to_dict)()

    fields: dict[str, Any] = {}
    if profiler:
        fields["ProfilerConfig"] = ProfilerConfig(
            s3_output_path=output_s3_uri, system_monitor_interval_millis=system_monitor_interval_millis
        )._to_request_dict()
        fields["ProfilerRuleConfigurations"] = [
            request(ProfilerRule.sagemaker(built_in(name)), "to_profiler_rule_config_dict") for name in profiler_rules
        ]
    if debugger:
        fields["DebugHookConfig"] = DebuggerHookConfig(
            s3_output_path=output_s3_uri,
            collection_configs=[
                CollectionConfig(name, parameters={"save_interval": str(save_interval)}) for name in collections
            ],
        )._to_request_dict()
        rules = []
        for name in debugger_rules:
            settings = rule_settings.get(name, {})
            if settings is False:
                log.info("Debugger rule %s is off in callbacks.debugger.rules; not adding it to the job.", name)
                continue
            parameters = {k: str(v) for k, v in (settings or {}).items() if k != "stop_training_on_fire"}
            rule = Rule.sagemaker(built_in(name), rule_parameters=parameters or None)
            rules.append(request(rule, "to_debugger_rule_config_dict"))
        fields["DebugRuleConfigurations"] = rules
    return fields


def mlflow_tracking(*, tracking_arn: str, experiment_name: str) -> tuple[dict[str, str], dict[str, Any]]:
    """The container environment and the CreateTrainingJob fields that send a job's MLflow runs to SageMaker
    managed MLflow.

    The job's ``logger=mlflow`` reads the server from ``MLFLOW_TRACKING_URI`` (an ARN, which the
    ``sagemaker-mlflow`` plugin of the job's requirements resolves and signs). CreateTrainingJob's own
    ``MlflowConfig`` (sagemaker-core's ``TrainingJob.create`` has it; SDK v3's ``ModelTrainer`` does not, so it
    goes in through :func:`add_to_training_job_requests`) links the job to the server in SageMaker's console. A
    tuning job's training definition has no ``MlflowConfig`` field: its jobs get the environment only.
    """
    environment = {"MLFLOW_TRACKING_URI": tracking_arn, "MLFLOW_EXPERIMENT_NAME": experiment_name}
    fields = {"MlflowConfig": {"MlflowResourceArn": tracking_arn, "MlflowExperimentName": experiment_name}}
    return environment, fields


def add_to_training_job_requests(session: Any, fields: Mapping[str, Any]) -> None:
    """Add ``fields`` to every CreateTrainingJob request of ``session`` (``ModelTrainer`` has no place for them)."""

    def add(params: dict[str, Any], **kwargs: Any) -> None:
        params.update(fields)

    session.boto_session.events.register(
        "before-parameter-build.sagemaker.CreateTrainingJob", add, unique_id=f"dogbreed-{'-'.join(sorted(fields))}"
    )


def launch_train(trainer: Any, inputs: Sequence[Any], *, wait: bool) -> str:
    """Submit the training job; return its name."""
    trainer.train(input_data_config=list(inputs), wait=wait, logs=wait)
    name = trainer._latest_training_job.training_job_name
    output = trainer.output_data_config.s3_output_path.rstrip("/")
    log.info("Training job %s submitted; model: %s/%s/output/model.tar.gz", name, output, name)
    return name
