"""The launcher with the real SageMaker SDK v3 against a local moto server: what reaches the AWS API.

Each test reads back the JSON bodies the SDK sent (a ``before-send`` hook on the session's boto3 events, which
every client the SDK creates inherits). ``SAGEMAKER_VALIDATE_ROLE=false``: the SDK's role check calls
iam:SimulatePrincipalPolicy, which moto does not implement.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import boto3
import pytest
import torch

from dogbreed.sagemaker import launcher, training
from dogbreed.sagemaker.hyperparameters import hyperparameters_to_overrides, metric_regex

BUCKET = "dogbreed-test"
ROLE = "arn:aws:iam::123456789012:role/SageMakerRole"
RULES = {"VanishingGradient", "Overfit", "Overtraining", "PoorWeightInitialization", "LossNotDecreasing"}
TOOLKIT_KEYS = {"sagemaker_program", "sagemaker_submit_directory", "sagemaker_container_log_level", "sagemaker_region"}


@pytest.fixture
def sm(aws_env: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., tuple[Any, Any, dict]]]:
    """Factory: (config, session, the JSON bodies each SageMaker API call sent, by operation); no telemetry."""
    monkeypatch.setenv("SAGEMAKER_VALIDATE_ROLE", "false")
    s3 = boto3.client("s3")
    if BUCKET not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
        s3.create_bucket(Bucket=BUCKET)
    from sagemaker.core.telemetry import telemetry_logging

    telemetry: list[tuple] = []
    monkeypatch.setattr(telemetry_logging, "_send_telemetry_request", lambda *args, **kwargs: telemetry.append(args))

    def make(*overrides: str) -> tuple[Any, Any, dict[str, list[dict]]]:
        cfg = launcher.compose_launch_config([f"sagemaker.role={ROLE}", f"sagemaker.bucket={BUCKET}", *overrides])
        session = launcher.session_for(cfg.sagemaker)
        sent: dict[str, list[dict]] = {}

        def record(request: Any, **kwargs: Any) -> None:  # the bytes on the wire, after the SDK's last word
            operation = request.headers["X-Amz-Target"].decode().split(".")[-1]
            sent.setdefault(operation, []).append(json.loads(request.body))

        session.boto_session.events.register("before-send.sagemaker", record)
        for described in ("Model", "EndpointConfig", "Endpoint"):
            session.boto_session.events.register(f"after-call.sagemaker.Describe{described}", _without_empty_shapes)
        return cfg, session, sent

    yield make
    assert telemetry == [], "telemetry despite sagemaker.telemetry_opt_out"


def _without_empty_shapes(parsed: dict, **kwargs: Any) -> None:
    """moto describes unset structures as ``{}`` (``VpcConfig``, ``DataCaptureConfig``), which SageMaker leaves
    out and sagemaker-core's resources reject; drop them as SageMaker would."""
    for key in [k for k, v in parsed.items() if v == {}]:
        del parsed[key]


def _s3_object(uri: str) -> bytes:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()


def _channels(config: list[dict]) -> dict[str, str]:
    return {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in config}


def overrides_keys(overrides: list[str]) -> list[str]:
    return [o.partition("=")[0] for o in overrides]


def newest_pytorch_training() -> str:
    """``major.minor`` of the newest PyTorch training image the installed SDK lists."""
    from packaging.version import Version
    from sagemaker.core import image_uris

    newest = max(image_uris.list_versions("pytorch", "training"), key=Version)
    return ".".join(newest.split(".")[:2])


def test_train_job_request(sm: Callable, image_folder: Callable[..., Path], tmp_path: Path) -> None:
    data = image_folder("dogs")
    weights = tmp_path / "resnet18-f37072fd.pth"
    torch.save({}, weights)
    job_overrides = ["experiment=demo", f"data.source={data}", f"model.weights={weights}", "model.lr=3e-4"]
    cfg, session, sent = sm(*job_overrides, "sagemaker.network_isolation=true")
    _, job = launcher.split_overrides([*job_overrides, "sagemaker.network_isolation=true"])
    assert job == job_overrides
    name = launcher.launch_train(cfg, job, session=session)

    (request,) = sent["CreateTrainingJob"]
    hps = request["HyperParameters"]
    # the container turns the hyperparameters back into exactly the user's overrides
    assert hyperparameters_to_overrides(hps) == job_overrides
    assert set(hps) - set(overrides_keys(job_overrides)) == TOOLKIT_KEYS
    # script mode of the image's own training toolkit: the entry script from the code channel
    assert json.loads(hps["sagemaker_program"]) == "dogbreed_entry.py"
    assert json.loads(hps["sagemaker_submit_directory"]) == "/opt/ml/input/data/code/sourcedir.tar.gz"
    spec = request["AlgorithmSpecification"]
    assert "ContainerEntrypoint" not in spec
    metrics = {m["Name"]: m["Regex"] for m in spec["MetricDefinitions"]}
    assert metrics == {name: metric_regex(name) for name in cfg.sagemaker.metrics}
    # ml.g5.xlarge: the GPU image of the newest PyTorch the SDK knows
    assert f"/pytorch-training:{newest_pytorch_training()}" in spec["TrainingImage"]
    assert "-gpu-" in spec["TrainingImage"]
    # SageMaker-side debugger and profiler are opt-in
    assert not {"DebugHookConfig", "DebugRuleConfigurations", "ProfilerRuleConfigurations"} & set(request)
    assert "CheckpointConfig" not in request and not request.get("EnableManagedSpotTraining")
    assert request["EnableNetworkIsolation"] is True
    assert request["OutputDataConfig"]["S3OutputPath"] == f"s3://{BUCKET}/dogbreed/output"
    channels = _channels(request["InputDataConfig"])
    assert channels["training"] == f"s3://{BUCKET}/dogbreed/data/dogs"
    assert channels["weights"] == f"s3://{BUCKET}/dogbreed/weights/{weights.name}"
    assert channels["code"].startswith(f"s3://{BUCKET}/dogbreed/code/dogbreed-")

    # the server has the job, the dataset and the code the container will run
    described = session.sagemaker_client.describe_training_job(TrainingJobName=name)
    assert described["HyperParameters"] == hps
    keys = [
        o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix="dogbreed/data/dogs")["Contents"]
    ]
    assert any(k.endswith("train/001.Alpha/001.Alpha_000.jpg") for k in keys)
    with tarfile.open(fileobj=io.BytesIO(_s3_object(channels["code"]))) as tar:
        members = set(tar.getnames())
        requirements = tar.extractfile("requirements.txt").read().decode()
    expected = {"dogbreed_entry.py", "dogbreed/conf/train.yaml", "dogbreed/train.py", "dogbreed/sagemaker/entry.py"}
    assert expected <= members
    assert "lightning" in requirements and "torch" not in requirements.replace("torchmetrics", "")


def test_spot_multi_instance_job_checkpoints_and_trains_ddp(sm: Callable) -> None:
    job = ["data.source=s3://b/dogImages", "trainer.max_epochs=3"]
    cfg, session, sent = sm(*job, "sagemaker.instance_count=2", "sagemaker.spot=true")
    launcher.launch_train(cfg, job, session=session)
    (request,) = sent["CreateTrainingJob"]
    # spot: checkpoints sync to S3 and a restarted job resumes from them (see the entry point's tests)
    assert request["CheckpointConfig"] == {
        "S3Uri": f"s3://{BUCKET}/dogbreed/checkpoints",
        "LocalPath": "/opt/ml/checkpoints",
    }
    assert request["EnableManagedSpotTraining"] is True
    assert request["StoppingCondition"] == {"MaxRuntimeInSeconds": 86400, "MaxWaitTimeInSeconds": 172800}
    assert request["ResourceConfig"]["InstanceCount"] == 2
    hps = request["HyperParameters"]
    assert json.loads(hps["sagemaker_torch_distributed_enabled"]) is True  # the toolkit's torchrun launcher
    assert hyperparameters_to_overrides(hps) == [
        "data.source=s3://b/dogImages", "trainer.max_epochs=3", "trainer=ddp", "trainer.num_nodes=2"
    ]  # fmt: skip
    assert _channels(request["InputDataConfig"]).keys() == {"code", "training"}


MLFLOW_ARN = "arn:aws:sagemaker:us-east-1:123456789012:mlflow-tracking-server/dogbreed"


def test_jobs_log_to_sagemaker_managed_mlflow(sm: Callable) -> None:
    """Training and tuning jobs get logger=mlflow, the server in their environment and the plugin to reach it."""
    job = ["data.source=s3://b/dogImages", "trainer.max_epochs=3"]
    tracking = [f"sagemaker.mlflow.tracking_arn={MLFLOW_ARN}", "sagemaker.mlflow.experiment_name=breeds"]
    cfg, session, sent = sm(*job, *tracking)
    launcher.launch_train(cfg, job, session=session)
    (request,) = sent["CreateTrainingJob"]
    assert hyperparameters_to_overrides(request["HyperParameters"]) == [
        *job, "logger=mlflow", "logger.mlflow.experiment_name=breeds"
    ]  # fmt: skip
    assert request["Environment"] == {"MLFLOW_TRACKING_URI": MLFLOW_ARN, "MLFLOW_EXPERIMENT_NAME": "breeds"}
    assert request["MlflowConfig"] == {"MlflowResourceArn": MLFLOW_ARN, "MlflowExperimentName": "breeds"}
    with tarfile.open(fileobj=io.BytesIO(_s3_object(_channels(request["InputDataConfig"])["code"]))) as tar:
        requirements = tar.extractfile("requirements.txt").read().decode().split()
    assert {"mlflow<4,>=3.17", "sagemaker-mlflow>=0.5"} <= set(requirements)

    cfg, session, sent = sm(*job, "logger=many", *tracking, "sagemaker.base_job_name=dogbreed-mlflow")
    launcher.launch_tune(cfg, [*job, "logger=many"], session=session)
    (request,) = sent["CreateHyperParameterTuningJob"]
    definition = request["TrainingJobDefinition"]
    assert definition["Environment"] == {"MLFLOW_TRACKING_URI": MLFLOW_ARN, "MLFLOW_EXPERIMENT_NAME": "breeds"}
    static = hyperparameters_to_overrides(definition["StaticHyperParameters"])
    assert static[-2:] == ["logger=many", "logger.mlflow.experiment_name=breeds"]

    cfg, session, _ = sm(*job, "logger=csv", *tracking)
    with pytest.raises(launcher.LaunchError, match="logger=csv has no MLflow logger"):
        launcher.launch_train(cfg, [*job, "logger=csv"], session=session)


def test_sagemaker_rules_are_opt_in_with_the_local_thresholds(sm: Callable) -> None:
    job = ["data.source=s3://b/dogImages"]
    cfg, session, sent = sm(*job, "sagemaker.profiler.enabled=true", "sagemaker.debugger.enabled=true")
    launcher.launch_train(cfg, job, session=session)
    (request,) = sent["CreateTrainingJob"]
    assert request["ProfilerConfig"]["ProfilingIntervalInMilliseconds"] == 500
    assert [r["RuleConfigurationName"] for r in request["ProfilerRuleConfigurations"]] == ["ProfilerReport"]
    rules = {r["RuleConfigurationName"]: r["RuleParameters"] for r in request["DebugRuleConfigurations"]}
    assert set(rules) == RULES
    assert "sagemaker-debugger-rules" in request["DebugRuleConfigurations"][0]["RuleEvaluatorImage"]
    # the thresholds of the local debugger's config (conf/callbacks/debugger.yaml) reach SageMaker's rules
    assert float(rules["VanishingGradient"]["threshold"]) == cfg.callbacks.debugger.rules.vanishing_gradient.threshold
    hook = request["DebugHookConfig"]
    assert {c["CollectionName"] for c in hook["CollectionConfigurations"]} == {"losses", "gradients", "weights"}
    cfg.sagemaker.debugger.rules = ["no_such_rule"]
    with pytest.raises(launcher.LaunchError, match="no_such_rule"):
        launcher.sagemaker_rules(cfg)


def test_training_image_is_the_newest_unless_chosen() -> None:
    def image(**kwargs: Any) -> str:
        settings = {"framework_version": None, "py_version": None, "image_uri": None} | kwargs
        return training.training_image(region="eu-west-1", instance_type="ml.m5.xlarge", **settings)

    assert image().startswith(
        f"763104351884.dkr.ecr.eu-west-1.amazonaws.com/pytorch-training:{newest_pytorch_training()}"
    )
    assert "-cpu-py3" in image()
    assert image(framework_version="2.6.0", py_version="py312").endswith("/pytorch-training:2.6.0-cpu-py312")
    assert image(image_uri="123.dkr.ecr.eu-west-1.amazonaws.com/mine:1") == "123.dkr.ecr.eu-west-1.amazonaws.com/mine:1"
    with pytest.raises(launcher.LaunchError, match=r"framework_version=9\.9.*sagemaker\.image_uri"):
        image(framework_version="9.9")


def test_tune_job_request(sm: Callable) -> None:
    data = "s3://dogbreed-test/datasets/dogImages"
    cfg, session, sent = sm(
        "experiment=demo", f"data.source={data}", "model.lr=1e-3", "sagemaker.tuner.max_jobs=6",
        "sagemaker.tuner.max_parallel_jobs=3", "sagemaker.tuner.warm_start_parents=[dogbreed-earlier]",
        "sagemaker.spot=true", "sagemaker.network_isolation=true",
    )  # fmt: skip
    _, job = launcher.split_overrides(["experiment=demo", f"data.source={data}", "model.lr=1e-3"])
    launcher.launch_tune(cfg, job, session=session)

    (request,) = sent["CreateHyperParameterTuningJob"]
    tuning = request["HyperParameterTuningJobConfig"]
    assert tuning["Strategy"] == "Bayesian"
    # the best val/acc so far: SageMaker keeps a job's last value, and a job exports its best epoch
    assert tuning["HyperParameterTuningJobObjective"] == {"Type": "Maximize", "MetricName": "val/acc_best"}
    assert tuning["ResourceLimits"] == {"MaxNumberOfTrainingJobs": 6, "MaxParallelTrainingJobs": 3}
    assert tuning["TrainingJobEarlyStoppingType"] == "Auto"
    ranges = tuning["ParameterRanges"]
    continuous = {r["Name"]: r for r in ranges["ContinuousParameterRanges"]}
    assert continuous["model.lr"] == {
        "Name": "model.lr",
        "MinValue": "1e-05",
        "MaxValue": "0.01",
        "ScalingType": "Logarithmic",
    }
    assert continuous["model.weight_decay"]["ScalingType"] == "Logarithmic"
    assert continuous["model.weight_decay"]["MinValue"] == "1e-06"
    (batch,) = ranges["CategoricalParameterRanges"]
    # the container decodes the tuner's values back to Hydra values
    assert batch["Name"] == "data.batch_size"
    assert [hyperparameters_to_overrides({"data.batch_size": v})[0] for v in batch["Values"]] == [
        f"data.batch_size={n}" for n in (16, 32, 64, 128)
    ]
    assert request["WarmStartConfig"] == {
        "ParentHyperParameterTuningJobs": [{"HyperParameterTuningJobName": "dogbreed-earlier"}],
        "WarmStartType": "IdenticalDataAndAlgorithm",
    }
    definition = request["TrainingJobDefinition"]
    static = definition["StaticHyperParameters"]
    assert "model.lr" not in static  # tuned, not fixed
    assert hyperparameters_to_overrides(static) == ["experiment=demo", f"data.source={data}"]
    assert set(static) >= TOOLKIT_KEYS
    spec = definition["AlgorithmSpecification"]
    assert f"/pytorch-training:{newest_pytorch_training()}" in spec["TrainingImage"]
    metrics = {m["Name"]: m["Regex"] for m in spec["MetricDefinitions"]}
    assert metrics == {name: metric_regex(name) for name in cfg.sagemaker.metrics}  # jobs report the objective
    channels = _channels(definition["InputDataConfig"])
    assert channels["training"] == data and channels.keys() == {"code", "training"}
    assert definition["EnableNetworkIsolation"] is True
    assert definition["EnableManagedSpotTraining"] is True
    assert definition["CheckpointConfig"]["S3Uri"] == f"s3://{BUCKET}/dogbreed/checkpoints"
    assert definition["StoppingCondition"] == {"MaxRuntimeInSeconds": 86400, "MaxWaitTimeInSeconds": 172800}


def test_tuner_strategies(sm: Callable) -> None:
    cfg, session, _ = sm("experiment=demo", "sagemaker.tuner.strategy=Hyperband")
    trainer = launcher.make_trainer(cfg, session, ["experiment=demo"], checkpoints=False)
    tuner = launcher.make_tuner(cfg, trainer)
    assert tuner.early_stopping_type == "Off"
    assert tuner.strategy_config.hyperband_strategy_config.max_resource == cfg.trainer.max_epochs
    cfg.sagemaker.tuner.strategy = "Grid"
    with pytest.raises(launcher.LaunchError, match="categorical"):
        launcher.make_tuner(cfg, trainer)
    cfg.sagemaker.tuner.strategy = "Annealing"
    with pytest.raises(launcher.LaunchError, match="Bayesian"):
        launcher.make_tuner(cfg, trainer)


def test_tuner_objective_follows_optimized_metric_and_errors_name_the_key(sm: Callable) -> None:
    cfg, session, _ = sm("experiment=demo", "optimized_metric=val/loss", "hparams_search.direction=minimize")
    trainer = launcher.make_trainer(cfg, session, ["experiment=demo"], checkpoints=False)
    tuner = launcher.make_tuner(cfg, trainer)
    assert (tuner.objective_metric_name, tuner.objective_type) == ("val/loss_best", "Minimize")
    cfg.hparams_search.direction = "maximize"  # the running minimum of val/loss, maximised
    with pytest.raises(launcher.LaunchError, match=r"hparams_search\.direction='maximize'.*objective_metric=val/loss"):
        launcher.make_tuner(cfg, trainer)
    cfg.sagemaker.tuner.objective_metric = "val/f1_best"
    with pytest.raises(launcher.LaunchError, match=r"objective_metric='val/f1_best' is not in sagemaker\.metrics"):
        launcher.make_tuner(cfg, trainer)
    del cfg.sagemaker.tuner.objective_metric  # a conf/sagemaker copy from before the key existed
    with pytest.raises(launcher.LaunchError, match=r"objective_metric: \$\{optimized_metric\}_best"):
        launcher.make_tuner(cfg, trainer)


def test_missing_role_and_isolated_download_are_clear_errors(sm: Callable) -> None:
    with pytest.raises(launcher.LaunchError, match=r"sagemaker\.role"):
        launcher.launch(["train", f"sagemaker.bucket={BUCKET}", "experiment=demo"])
    cfg, session, _ = sm("sagemaker.network_isolation=true", "model.weights=IMAGENET1K_V1", "data.source=s3://b/d")
    with pytest.raises(launcher.LaunchError, match="network-isolated"):
        launcher.job_inputs(cfg, session)
    cfg, session, _ = sm("sagemaker.network_isolation=true", "data.source=https://example.com/dogImages.zip")
    with pytest.raises(launcher.LaunchError, match="network-isolated"):
        launcher.job_inputs(cfg, session)


def _training_output(tmp_path: Path) -> str:
    """What a training job uploads as model.tar.gz (the model dir's files), on the moto S3."""
    archive = tmp_path / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("model.pt", "model_config.json", "classes.json", "preprocessing.json"):
            (tmp_path / name).write_text("{}")
            tar.add(tmp_path / name, arcname=name)
    boto3.client("s3").upload_file(str(archive), BUCKET, "dogbreed/output/job-1/output/model.tar.gz")
    return f"s3://{BUCKET}/dogbreed/output/job-1/output/model.tar.gz"


def test_deploy_with_the_serving_image(sm: Callable, tmp_path: Path) -> None:
    model_data = _training_output(tmp_path)
    image = "123456789012.dkr.ecr.us-east-1.amazonaws.com/dogbreed-serve:cpu"
    cfg, session, sent = sm(
        f"sagemaker.deploy.model_data={model_data}", "sagemaker.deploy.endpoint_name=dogbreed-ep",
        f"sagemaker.deploy.image_uri={image}", "sagemaker.network_isolation=true",
    )  # fmt: skip
    assert launcher.deploy(cfg, session=session) == "dogbreed-ep"

    (model,) = sent["CreateModel"]
    # the training job's archive as it is: `serve` finds the model dir in /opt/ml/model
    assert model["PrimaryContainer"]["Image"] == image
    assert model["PrimaryContainer"]["ModelDataUrl"] == model_data
    assert model["ExecutionRoleArn"] == ROLE and model["EnableNetworkIsolation"] is True
    (config,) = sent["CreateEndpointConfig"]
    (variant,) = config["ProductionVariants"]
    assert variant["ModelName"] == model["ModelName"]
    assert (variant["InstanceType"], variant["InitialInstanceCount"]) == ("ml.m5.large", 1)
    (endpoint,) = sent["CreateEndpoint"]
    assert endpoint == {"EndpointName": "dogbreed-ep", "EndpointConfigName": config["EndpointConfigName"]}


def test_deploy_falls_back_to_the_stock_container_with_code(
    sm: Callable, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model_data = _training_output(tmp_path)
    cfg, session, sent = sm(f"sagemaker.deploy.model_data={model_data}", "sagemaker.deploy.endpoint_name=dogbreed-ep")
    assert launcher.deploy(cfg, session=session) == "dogbreed-ep"
    assert "container/Dockerfile" in caplog.text  # the warning points at the maintained image

    (model,) = sent["CreateModel"]
    container = model["PrimaryContainer"]
    assert container["Image"].endswith("/pytorch-inference:2.6.0-cpu-py312")
    assert container["Environment"]["SAGEMAKER_PROGRAM"] == "inference.py"
    assert container["Environment"]["SAGEMAKER_SUBMIT_DIRECTORY"] == "/opt/ml/model/code"
    assert container["ModelDataUrl"] == f"s3://{BUCKET}/dogbreed/deploy/dogbreed-ep/model.tar.gz"
    with tarfile.open(fileobj=io.BytesIO(_s3_object(container["ModelDataUrl"]))) as tar:
        members = set(tar.getnames())
    assert {"model.pt", "classes.json", "code/inference.py", "code/dogbreed/serve/handlers.py"} <= members


def test_deploy_needs_a_model(sm: Callable) -> None:
    cfg, session, _ = sm()
    with pytest.raises(launcher.LaunchError, match=r"sagemaker\.deploy\.training_job"):
        launcher.deploy(cfg, session=session)


def test_analytics_table_and_plot(sm: Callable, tmp_path: Path) -> None:
    from botocore.stub import Stubber

    cfg, session, _ = sm("sagemaker.analytics.tuning_job=dogbreed-tune", f"sagemaker.analytics.output_dir={tmp_path}")
    stub = Stubber(session.sagemaker_client)
    summaries = [
        {
            "TrainingJobName": f"dogbreed-tune-{i:03d}", "TrainingJobArn": f"arn:aws:sagemaker:x:{i}",
            "CreationTime": datetime(2026, 1, 1, i), "TrainingStartTime": datetime(2026, 1, 1, i),
            "TrainingEndTime": datetime(2026, 1, 1, i, 30), "TrainingJobStatus": "Completed",
            "TunedHyperParameters": {"model.lr": str(lr), "model.weight_decay": "0.0001", "data.batch_size": "32"},
            "FinalHyperParameterTuningJobObjectiveMetric": {"MetricName": "val/acc_best", "Value": acc},
            "ObjectiveStatus": "Succeeded",
        }
        for i, (lr, acc) in enumerate([(1e-4, 0.6), (1e-3, 0.8), (1e-2, 0.4)])
    ]  # fmt: skip
    stub.add_response("list_training_jobs_for_hyper_parameter_tuning_job", {"TrainingJobSummaries": summaries})
    stub.add_response(
        "describe_hyper_parameter_tuning_job",
        {
            "HyperParameterTuningJobName": "dogbreed-tune", "HyperParameterTuningJobArn": "arn:aws:sagemaker:x",
            "HyperParameterTuningJobStatus": "Completed", "CreationTime": datetime(2026, 1, 1),
            "HyperParameterTuningJobConfig": {
                "Strategy": "Bayesian", "ResourceLimits": {"MaxParallelTrainingJobs": 2},
                "HyperParameterTuningJobObjective": {"Type": "Maximize", "MetricName": "val/acc_best"},
            },
            "TrainingJobStatusCounters": {}, "ObjectiveStatusCounters": {},
        },
    )  # fmt: skip
    with stub:
        csv_path = launcher.analytics(cfg, session=session)
    table = csv_path.read_text().splitlines()
    assert len(table) == 4 and "FinalObjectiveValue" in table[0] and "model.lr" in table[0]
    assert (csv_path.parent / "jobs.png").stat().st_size > 0
