"""The launcher with the real SageMaker SDK v2 against a local moto server: what reaches the AWS API."""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import boto3
import pytest
import torch

os.environ.setdefault("SAGEMAKER_SUPPRESS_V2_WARNING", "1")  # v2 is pinned on purpose
pytest.importorskip("sagemaker", minversion="2.257")

from dogbreed.sagemaker import launcher
from dogbreed.sagemaker.hyperparameters import hyperparameters_to_overrides, metric_regex

BUCKET = "dogbreed-test"
ROLE = "arn:aws:iam::123456789012:role/SageMakerRole"
RULES = {"VanishingGradient", "Overfit", "Overtraining", "PoorWeightInitialization", "LossNotDecreasing"}


@pytest.fixture
def sm(aws_env: str, monkeypatch: pytest.MonkeyPatch) -> Callable[..., tuple[Any, dict[str, list[dict]]]]:
    """Factory: (config, session) plus the exact JSON bodies each SageMaker API call sent, by operation."""
    s3 = boto3.client("s3")
    if BUCKET not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
        s3.create_bucket(Bucket=BUCKET)
    from sagemaker.telemetry import telemetry_logging

    def no_telemetry(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("telemetry request despite TelemetryOptOut")

    monkeypatch.setattr(telemetry_logging, "_requests_helper", no_telemetry)

    def make(*overrides: str) -> tuple[Any, Any, dict[str, list[dict]]]:
        args = [f"sagemaker.role={ROLE}", f"sagemaker.bucket={BUCKET}", *overrides]
        cfg = launcher.compose_launch_config(args)
        session = launcher.make_session(cfg.sagemaker)
        sent: dict[str, list[dict]] = {}

        def record(request: Any, **kwargs: Any) -> None:  # the bytes on the wire, after the SDK's last word
            operation = request.headers["X-Amz-Target"].decode().split(".")[-1]
            sent.setdefault(operation, []).append(json.loads(request.body))

        session.sagemaker_client.meta.events.register("before-send.sagemaker", record)
        return cfg, session, sent

    return make


def _s3_object(uri: str) -> bytes:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()


@pytest.mark.slow
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
    assert json.loads(hps["sagemaker_program"]) == "dogbreed_entry.py"
    metrics = {m["Name"]: m["Regex"] for m in request["AlgorithmSpecification"]["MetricDefinitions"]}
    assert metrics == {name: metric_regex(name) for name in cfg.sagemaker.metrics}
    assert "pytorch-training:2.6" in request["AlgorithmSpecification"]["TrainingImage"]
    assert request["ProfilerConfig"]["ProfilingIntervalInMilliseconds"] == 500
    rules = {r["RuleConfigurationName"].split("-")[0]: r["RuleParameters"] for r in request["DebugRuleConfigurations"]}
    assert set(rules) == RULES
    if "vanishing_gradient" in cfg.get("callbacks", {}).get("debugger", {}).get("rules", {}):
        # the thresholds of the local debugger's config (conf/callbacks/debugger.yaml) reach SageMaker's rules
        assert (
            float(rules["VanishingGradient"]["threshold"]) == cfg.callbacks.debugger.rules.vanishing_gradient.threshold
        )
    assert [r["RuleConfigurationName"].split("-")[0] for r in request["ProfilerRuleConfigurations"]] == [
        "ProfilerReport"
    ]
    hook = request["DebugHookConfig"]
    # the configured collections, plus those the rules need (relu_input for poor_weight_initialization)
    assert {"losses", "gradients", "weights"} <= {c["CollectionName"] for c in hook["CollectionConfigurations"]}
    assert "CheckpointConfig" not in request and not request.get("EnableManagedSpotTraining")
    assert request["EnableNetworkIsolation"] is True
    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in request["InputDataConfig"]}
    assert channels["training"] == f"s3://{BUCKET}/dogbreed/data/dogs"
    assert channels["weights"] == f"s3://{BUCKET}/dogbreed/weights/{weights.name}"
    assert "code" in channels  # network isolation: the code comes in as a channel too

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
    assert json.loads(hps["sagemaker_torch_distributed_enabled"]) is True  # SageMaker's torchrun launcher
    assert hyperparameters_to_overrides(hps) == [
        "data.source=s3://b/dogImages", "trainer.max_epochs=3", "trainer=ddp", "trainer.num_nodes=2"
    ]  # fmt: skip


@pytest.mark.parametrize(("instance_count", "spot"), [(1, True), (2, True), (1, False)])
def test_checkpointing_jobs_lose_the_debugger_hook_and_say_so(
    sm: Callable, caplog: pytest.LogCaptureFixture, instance_count: int, spot: bool
) -> None:
    """SDK v2 drops the hook of every checkpointing PyTorch job, one instance too (it counts its ``{}``
    distribution as distributed); the launcher's warning must match what reaches the API."""
    job = ["data.source=s3://b/dogImages"]
    cfg, session, sent = sm(*job, f"sagemaker.instance_count={instance_count}", f"sagemaker.spot={spot}")
    with caplog.at_level(logging.WARNING, logger=launcher.__name__):
        launcher.launch_train(cfg, job, session=session)
    (request,) = sent["CreateTrainingJob"]
    assert ("CheckpointConfig" in request) is spot
    assert ("DebugHookConfig" in request) is not spot
    # debugger rules without a hook would read nothing and still bill an instance each: left out
    rules = {r["RuleConfigurationName"].split("-")[0] for r in request.get("DebugRuleConfigurations", [])}
    assert ("VanishingGradient" in rules) is not spot
    profiler_rules = [r["RuleConfigurationName"].split("-")[0] for r in request["ProfilerRuleConfigurations"]]
    assert profiler_rules == ["ProfilerReport"]
    warned = [r for r in caplog.records if r.name == launcher.__name__ and "debugger hook off" in r.getMessage()]
    assert bool(warned) is spot
    if spot:
        assert "train without spot and always_checkpoint" in warned[0].getMessage()
    assert "ProfilerConfig" in request  # profiler rules are unaffected either way


def test_tune_job_request(sm: Callable) -> None:
    data = "s3://dogbreed-test/datasets/dogImages"
    cfg, session, sent = sm(
        "experiment=demo", f"data.source={data}", "model.lr=1e-3", "sagemaker.tuner.max_jobs=6",
        "sagemaker.tuner.max_parallel_jobs=3", "sagemaker.tuner.warm_start_parents=[dogbreed-earlier]",
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
    # framework estimators JSON-encode categorical values; the container decodes them back to Hydra values
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
    assert [o for o in hyperparameters_to_overrides(static)] == ["experiment=demo", f"data.source={data}"]
    metrics = {m["Name"]: m["Regex"] for m in definition["AlgorithmSpecification"]["MetricDefinitions"]}
    assert metrics["val/acc_best"] == metric_regex("val/acc_best")  # jobs report the objective
    assert "val/acc" in metrics
    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in definition["InputDataConfig"]}
    assert channels == {"training": data}


def test_tuner_strategies(sm: Callable, tmp_path: Path) -> None:
    cfg, session, _ = sm("experiment=demo", "sagemaker.tuner.strategy=Hyperband")
    estimator = launcher.make_estimator(cfg, session, ["experiment=demo"], tmp_path, for_tuning=True)
    tuner = launcher.make_tuner(cfg, estimator)
    assert tuner.early_stopping_type == "Off"
    assert tuner.strategy_config.hyperband_strategy_config.max_resource == cfg.trainer.max_epochs
    cfg.sagemaker.tuner.strategy = "Grid"
    with pytest.raises(launcher.LaunchError, match="categorical"):
        launcher.make_tuner(cfg, estimator)
    cfg.sagemaker.debugger.rules = ["no_such_rule"]
    with pytest.raises(launcher.LaunchError, match="no_such_rule"):
        launcher.profiler_and_debugger(cfg.sagemaker)


def test_tuner_objective_follows_optimized_metric_and_errors_name_the_key(sm: Callable, tmp_path: Path) -> None:
    cfg, session, _ = sm("experiment=demo", "optimized_metric=val/loss", "hparams_search.direction=minimize")
    estimator = launcher.make_estimator(cfg, session, ["experiment=demo"], tmp_path, for_tuning=True)
    tuner = launcher.make_tuner(cfg, estimator)
    assert (tuner.objective_metric_name, tuner.objective_type) == ("val/loss_best", "Minimize")
    cfg.hparams_search.direction = "maximize"  # the running minimum of val/loss, maximised
    with pytest.raises(launcher.LaunchError, match=r"hparams_search\.direction='maximize'.*objective_metric=val/loss"):
        launcher.make_tuner(cfg, estimator)
    cfg.sagemaker.tuner.objective_metric = "val/f1_best"
    with pytest.raises(launcher.LaunchError, match=r"objective_metric='val/f1_best' is not in sagemaker\.metrics"):
        launcher.make_tuner(cfg, estimator)
    del cfg.sagemaker.tuner.objective_metric  # a conf/sagemaker copy from before the key existed
    with pytest.raises(launcher.LaunchError, match=r"objective_metric: \$\{optimized_metric\}_best"):
        launcher.make_tuner(cfg, estimator)


def test_missing_role_and_isolated_download_are_clear_errors(sm: Callable) -> None:
    with pytest.raises(launcher.LaunchError, match=r"sagemaker\.role"):
        launcher.launch(["train", f"sagemaker.bucket={BUCKET}", "experiment=demo"])
    cfg, session, _ = sm("sagemaker.network_isolation=true", "model.weights=IMAGENET1K_V1", "data.source=s3://b/d")
    with pytest.raises(launcher.LaunchError, match="network-isolated"):
        launcher.channels(cfg, session)


@pytest.mark.slow
def test_deploy_repacks_model_with_serving_code(sm: Callable, tmp_path: Path) -> None:
    archive = tmp_path / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:  # what a training job uploads: the model dir's files
        for name in ("model.pt", "model_config.json", "classes.json", "preprocessing.json"):
            (tmp_path / name).write_text("{}")
            tar.add(tmp_path / name, arcname=name)
    boto3.client("s3").upload_file(str(archive), BUCKET, "dogbreed/output/job-1/output/model.tar.gz")
    model_data = f"s3://{BUCKET}/dogbreed/output/job-1/output/model.tar.gz"
    cfg, session, sent = sm(f"sagemaker.deploy.model_data={model_data}", "sagemaker.deploy.endpoint_name=dogbreed-ep")
    assert launcher.deploy(cfg, session=session) == "dogbreed-ep"

    (model,) = sent["CreateModel"]
    container = model["PrimaryContainer"]
    assert "pytorch-inference:2.6" in container["Image"]
    assert container["Environment"]["SAGEMAKER_PROGRAM"] == "inference.py"
    with tarfile.open(fileobj=io.BytesIO(_s3_object(container["ModelDataUrl"]))) as tar:
        members = set(tar.getnames())
    assert {"model.pt", "classes.json", "code/inference.py", "code/dogbreed/serve/handlers.py"} <= members
    (endpoint,) = sent["CreateEndpoint"]
    assert endpoint["EndpointName"] == "dogbreed-ep"
    (config,) = sent["CreateEndpointConfig"]
    assert config["ProductionVariants"][0]["InstanceType"] == "ml.m5.large"


def test_analytics_table_and_plot(sm: Callable, tmp_path: Path) -> None:
    from botocore.stub import Stubber

    cfg, session, _ = sm("sagemaker.analytics.tuning_job=dogbreed-tune", f"sagemaker.analytics.output_dir={tmp_path}")
    stub = Stubber(session.sagemaker_client)
    summaries = [
        {
            "TrainingJobName": f"dogbreed-tune-{i:03d}", "TrainingJobArn": f"arn:aws:sagemaker:x:{i}",
            "CreationTime": datetime(2026, 1, 1, i), "TrainingStartTime": datetime(2026, 1, 1, i),
            "TrainingEndTime": datetime(2026, 1, 1, i, 30), "TrainingJobStatus": "Completed",
            "TunedHyperParameters": {"model.lr": str(lr), "model.weight_decay": "0.0001", "data.batch_size": '"32"'},
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
