"""Build SageMaker training jobs, tuning jobs, endpoints and tuning analytics from the Hydra configs.

``conf/launch_sagemaker.yaml`` = the training config + the search space + ``conf/sagemaker/``. Overrides
of ``sagemaker.*``, ``tune.*`` and ``hparams_search`` configure the launcher; every other override becomes
a job hyperparameter that the container's entry point (:mod:`dogbreed.sagemaker.entry`) turns back into the
same Hydra override, so the job trains exactly what ``python -m dogbreed.train <overrides>`` would.

Uses the SageMaker Python SDK v2 (``pip install dogbreed[sagemaker]``); v3 dropped the estimator's
debugger and profiler configuration.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

import dogbreed
from dogbreed.config import CONFIG_DIR, search_space
from dogbreed.data.staging import is_remote, split_s3_uri
from dogbreed.models.classifier import BEST_MODES
from dogbreed.sagemaker.entry import DATA_CHANNEL, ENTRY_SCRIPT, WEIGHTS_CHANNEL
from dogbreed.sagemaker.hyperparameters import metric_definitions, overrides_to_hyperparameters

log = logging.getLogger(__name__)

LAUNCHER_KEYS = ("sagemaker", "tune", "hparams_search")
STRATEGIES = ("Bayesian", "Random", "Hyperband", "Grid")
# The training container provides these; reinstalling torch from requirements.txt would replace its build.
CONTAINER_PROVIDED = {"torch", "torchvision", "boto3", "numpy", "pillow"}
ENTRY_PY = '''"""SageMaker entry point written by dogbreed's launcher: run dogbreed.train in the job's layout."""

from dogbreed.sagemaker.entry import main

if __name__ == "__main__":
    main()
'''


class LaunchError(ValueError):
    """A launcher setting is missing or inconsistent; the message names the setting and the fix."""


def split_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(launcher overrides, job overrides)``: ``sagemaker.*``/``tune.*``/``hparams_search`` stay local."""
    local, job = [], []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        (local if key.split(".", 1)[0] in LAUNCHER_KEYS else job).append(override)
    return local, job


def compose_launch_config(overrides: Sequence[str]) -> DictConfig:
    """``conf/launch_sagemaker.yaml`` with all overrides (the launcher reads the job's config too)."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        return compose("launch_sagemaker", overrides=list(overrides))


def _required(sm: DictConfig, key: str) -> Any:
    if OmegaConf.is_missing(sm, key):
        raise LaunchError(f"sagemaker.{key} is not set; pass sagemaker.{key}=... or set it in conf/sagemaker/.")
    return sm[key]


def make_session(sm: DictConfig) -> Any:
    """A ``sagemaker.Session`` for ``sagemaker.region``, honouring ``AWS_ENDPOINT_URL`` and the telemetry opt-out."""
    os.environ.setdefault("SAGEMAKER_SUPPRESS_V2_WARNING", "1")  # v2 is pinned on purpose (see module doc)
    import boto3
    import sagemaker
    from sagemaker.config import load_sagemaker_config

    config = load_sagemaker_config()
    if sm.telemetry_opt_out:
        config.setdefault("SchemaVersion", "1.0")
        modules = config.setdefault("SageMaker", {}).setdefault("PythonSDK", {}).setdefault("Modules", {})
        modules["TelemetryOptOut"] = True
    return sagemaker.Session(
        boto_session=boto3.Session(region_name=sm.region),
        default_bucket=_required(sm, "bucket"),
        sagemaker_config=config,
    )


def requirements() -> list[str]:
    """dogbreed's own dependencies (from its metadata) minus what the PyTorch container already has."""
    try:
        requires = importlib.metadata.requires("dogbreed") or []
    except importlib.metadata.PackageNotFoundError:
        raise LaunchError("dogbreed is not installed; run `pip install -e .[sagemaker]` first.") from None
    kept = []
    for req in requires:
        if "extra ==" in req:
            continue
        name = re.split(r"[<>=!~ ;\[]", req, maxsplit=1)[0].lower()
        if name not in CONTAINER_PROVIDED:
            kept.append(req)
    return kept


@contextlib.contextmanager
def source_dir() -> Iterator[Path]:
    """A temporary copy of the code the job runs: ``dogbreed/`` with its ``conf/``, the entry script, requirements."""
    with tempfile.TemporaryDirectory(prefix="dogbreed-source-") as tmp:
        root = Path(tmp)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "demo_data")
        package = root / "dogbreed"
        shutil.copytree(Path(dogbreed.__file__).resolve().parent, package, ignore=ignore)
        # a wheel already holds dogbreed/conf; an editable install keeps it in the checkout's conf/
        shutil.copytree(CONFIG_DIR, package / "conf", ignore=ignore, dirs_exist_ok=True)
        (root / ENTRY_SCRIPT).write_text(ENTRY_PY)
        (root / "requirements.txt").write_text("\n".join(requirements()) + "\n")
        yield root


def _s3_join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts)


def _upload_file(session: Any, path: Path, uri: str) -> str:
    bucket, key = split_s3_uri(uri)
    session.boto_session.client("s3").upload_file(str(path), bucket, key)
    return uri


def data_input(cfg: DictConfig, session: Any) -> str | None:
    """The S3 URI of the ``training`` channel: configured, ``data.source`` itself, or ``data.source`` uploaded."""
    sm = cfg.sagemaker
    if sm.data_s3_uri:
        return str(sm.data_s3_uri)
    source = str(cfg.data.source)
    if source.startswith("s3://"):
        return source
    if is_remote(source):  # https archive: the job downloads it itself
        if sm.network_isolation:
            raise LaunchError(
                f"data.source={source!r} cannot be downloaded by a network-isolated job; upload it with "
                "`python -m dogbreed.data upload DIR s3://...` and set data.source (or sagemaker.data_s3_uri)."
            )
        return None
    from dogbreed.data import upload

    folder = Path(source).expanduser()
    uri = f"s3://{_s3_join(sm.bucket, sm.prefix, 'data', folder.resolve().name)}"
    log.info("Uploading %s to %s", folder, uri)
    upload(folder, uri)
    return uri


def weights_input(cfg: DictConfig, session: Any) -> str | None:
    """The S3 URI of the ``weights`` channel, or None when the job resolves ``model.weights`` itself."""
    sm = cfg.sagemaker
    if sm.weights_s3_uri:
        return str(sm.weights_s3_uri)
    weights = cfg.model.get("weights")
    if weights is None:
        return None
    weights = str(weights)
    if weights.startswith("s3://"):
        return weights
    path = Path(weights).expanduser()
    if path.is_file():
        return _upload_file(session, path, f"s3://{_s3_join(sm.bucket, sm.prefix, 'weights', path.name)}")
    if sm.network_isolation:
        raise LaunchError(
            f"model.weights={weights!r} must be downloaded, which a network-isolated job cannot do; set "
            "model.weights=/path/to/resnet18-f37072fd.pth (uploaded for you) or sagemaker.weights_s3_uri=s3://..."
        )
    return None


def local_rule_settings(cfg: DictConfig) -> dict[str, Any]:
    """The local debugger's rule settings (``callbacks.debugger.rules``), so both run the same thresholds."""
    rules = OmegaConf.select(cfg, "callbacks.debugger.rules")
    return OmegaConf.to_container(rules, resolve=True) if rules is not None else {}


def profiler_and_debugger(
    sm: DictConfig, rule_settings: dict[str, Any] | None = None, *, debugger: bool = True
) -> dict[str, Any]:
    """Estimator arguments for the profiler, the debugger hook and the rules chosen in config.

    Args:
        sm: ``cfg.sagemaker``.
        rule_settings: Per-rule parameters (SageMaker's parameter names) from the local debugger's config;
            a rule set to ``false`` there is left out here too.
        debugger: False where the SDK would drop the hook anyway: the debugger rules, which would read no
            tensors and still bill a rule instance each, are left out too; profiler rules stay.
    """
    rule_settings = rule_settings or {}
    from sagemaker.debugger import (
        CollectionConfig,
        DebuggerHookConfig,
        ProfilerConfig,
        ProfilerRule,
        Rule,
        rule_configs,
    )

    def rule_config(name: str) -> Any:
        if not hasattr(rule_configs, name):
            known = sorted(n for n in dir(rule_configs) if not n.startswith("_"))
            raise LaunchError(f"sagemaker.debugger rule {name!r} is not a built-in rule; choose from {known}.")
        return getattr(rule_configs, name)()

    kwargs: dict[str, Any] = {}
    output = _s3_join(sm.output_s3_uri)
    if sm.profiler.enabled:
        kwargs["profiler_config"] = ProfilerConfig(
            s3_output_path=output, system_monitor_interval_millis=sm.profiler.system_monitor_interval_millis
        )
    else:
        kwargs["disable_profiler"] = True
    rules = []
    if sm.debugger.enabled and debugger:
        kwargs["debugger_hook_config"] = DebuggerHookConfig(
            s3_output_path=output,
            collection_configs=[
                CollectionConfig(name, parameters={"save_interval": str(sm.debugger.save_interval)})
                for name in sm.debugger.collections
            ],
        )
        for name in sm.debugger.rules:
            settings = rule_settings.get(name, {})
            if settings is False:
                log.info("Debugger rule %s is off in callbacks.debugger.rules; not adding it to the job.", name)
                continue
            parameters = {k: str(v) for k, v in (settings or {}).items() if k != "stop_training_on_fire"}
            rules.append(Rule.sagemaker(rule_config(name), rule_parameters=parameters or None))
    else:
        kwargs["debugger_hook_config"] = False
    if sm.profiler.enabled:
        rules += [ProfilerRule.sagemaker(rule_config(name)) for name in sm.debugger.profiler_rules]
    if rules:
        kwargs["rules"] = rules
    return kwargs


def make_estimator(
    cfg: DictConfig, session: Any, job_overrides: Sequence[str], code_dir: Path, *, for_tuning: bool = False
) -> Any:
    """The ``PyTorch`` estimator whose entry point runs ``dogbreed.train`` with ``job_overrides``.

    Tuning jobs get no debugger rules or profiler (a tuning job's training definition has no place for
    them); train the best configuration afterwards with ``train`` to get the reports.
    """
    from sagemaker.pytorch import PyTorch

    sm = cfg.sagemaker
    hyperparameters = overrides_to_hyperparameters(job_overrides)
    distribution = None
    if sm.instance_count > 1:
        # SageMaker's torchrun launcher sets the env Lightning's DDP reads (MASTER_ADDR, NODE_RANK, ...)
        distribution = {"torch_distributed": {"enabled": True}}
        hyperparameters.setdefault("trainer", "ddp")
        hyperparameters["trainer.num_nodes"] = str(sm.instance_count)
    if sm.network_isolation and not sm.image_uri:
        log.warning(
            "Network isolation: the container cannot pip install requirements.txt (%s); use an image that has "
            "them (sagemaker.image_uri).",
            ", ".join(requirements()),
        )
    checkpoints = bool(sm.spot or sm.always_checkpoint)
    if checkpoints and sm.debugger.enabled and not for_tuning:
        # SDK v2 (Framework._validate_and_set_debugger_configs) drops the hook of a checkpointing job that it deems
        # distributed: instance_count > 1 or a distribution that is not None. PyTorch stores distribution=None as
        # {}, so that is every PyTorch job, one instance included (the tests pin this against the SDK).
        log.warning(
            "The SageMaker SDK turns the debugger hook off for every PyTorch job that checkpoints (sagemaker.spot or "
            "sagemaker.always_checkpoint), on one instance too, so the job gets no SageMaker debugger rules. The "
            "in-job rules (callbacks.debugger) still run and write debug-output/ into the job's output.tar.gz, and "
            "profiler rules are unaffected; for SageMaker's debugger rules, train without spot and always_checkpoint."
        )
    kwargs: dict[str, Any] = (
        {} if for_tuning else profiler_and_debugger(sm, local_rule_settings(cfg), debugger=not checkpoints)
    )
    if for_tuning:
        kwargs.update(disable_profiler=True, debugger_hook_config=False)
    return PyTorch(
        entry_point=ENTRY_SCRIPT,
        source_dir=str(code_dir),
        role=_required(sm, "role"),
        instance_type=sm.instance_type,
        instance_count=sm.instance_count,
        volume_size=sm.volume_size,
        framework_version=None if sm.image_uri else str(sm.framework_version),
        py_version=None if sm.image_uri else sm.py_version,
        image_uri=sm.image_uri,
        hyperparameters=hyperparameters,
        metric_definitions=metric_definitions(sm.metrics),
        base_job_name=sm.base_job_name,
        output_path=sm.output_s3_uri,
        code_location=sm.code_s3_uri,
        max_run=sm.max_run,
        use_spot_instances=bool(sm.spot),
        max_wait=(sm.max_wait or 2 * sm.max_run) if sm.spot else None,
        checkpoint_s3_uri=sm.checkpoint_s3_uri if checkpoints else None,
        checkpoint_local_path="/opt/ml/checkpoints" if checkpoints else None,
        enable_network_isolation=bool(sm.network_isolation),
        distribution=distribution,
        sagemaker_session=session,
        **kwargs,
    )


def channels(cfg: DictConfig, session: Any) -> dict[str, Any]:
    from sagemaker.inputs import TrainingInput

    inputs = {}
    if uri := data_input(cfg, session):
        inputs[DATA_CHANNEL] = TrainingInput(uri)
    if uri := weights_input(cfg, session):
        inputs[WEIGHTS_CHANNEL] = TrainingInput(uri)
    return inputs


def launch_train(cfg: DictConfig, job_overrides: Sequence[str], session: Any | None = None) -> str:
    """Submit a training job; return its name."""
    _required(cfg.sagemaker, "role")  # before uploading anything
    session = session or make_session(cfg.sagemaker)
    inputs = channels(cfg, session)
    with source_dir() as code:
        estimator = make_estimator(cfg, session, job_overrides, code)
        estimator.fit(inputs or None, wait=bool(cfg.sagemaker.wait), logs="All" if cfg.sagemaker.wait else "None")
    name = estimator.latest_training_job.name
    log.info("Training job %s submitted; model: %s/%s/output/model.tar.gz", name, cfg.sagemaker.output_s3_uri, name)
    return name


def hyperparameter_ranges(cfg: DictConfig) -> dict[str, Any]:
    """SageMaker parameter ranges from ``hparams_search`` (log scale -> ``Logarithmic``)."""
    from sagemaker.tuner import CategoricalParameter, ContinuousParameter, IntegerParameter

    ranges: dict[str, Any] = {}
    for name, spec in search_space(cfg).items():
        scaling = "Logarithmic" if spec.get("log") else "Linear"
        if spec["type"] == "float":
            ranges[name] = ContinuousParameter(spec["low"], spec["high"], scaling_type=scaling)
        elif spec["type"] == "int":
            ranges[name] = IntegerParameter(spec["low"], spec["high"], scaling_type=scaling)
        else:
            ranges[name] = CategoricalParameter(list(spec["choices"]))
    return ranges


def objective_metric(cfg: DictConfig) -> str:
    """The metric the tuner scores jobs by: ``sagemaker.tuner.objective_metric``, checked against the job's metrics.

    SageMaker takes the last value a job printed; the default, ``${optimized_metric}_best``, is the best value so
    far, so a job whose last epochs overfit is still scored by the best epoch, whose weights it exports.
    """
    tc, direction = cfg.sagemaker.tuner, cfg.hparams_search.direction
    if "objective_metric" not in tc:
        raise LaunchError(
            "sagemaker.tuner.objective_metric is not set; add `objective_metric: ${optimized_metric}_best` under "
            "tuner in your conf/sagemaker file (see conf/sagemaker/default.yaml)."
        )
    metric = str(tc.objective_metric)
    if metric not in cfg.sagemaker.metrics:
        raise LaunchError(
            f"sagemaker.tuner.objective_metric={metric!r} is not in sagemaker.metrics {list(cfg.sagemaker.metrics)}, "
            "so no job would report it; add it there if training prints it, or set sagemaker.tuner.objective_metric "
            "to one of them."
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


def make_tuner(cfg: DictConfig, estimator: Any) -> Any:
    """A ``HyperparameterTuner`` over ``hparams_search`` with the configured strategy."""
    from sagemaker.tuner import (
        CategoricalParameter,
        HyperbandStrategyConfig,
        HyperparameterTuner,
        StrategyConfig,
        WarmStartConfig,
        WarmStartTypes,
    )

    tc = cfg.sagemaker.tuner
    if tc.strategy not in STRATEGIES:
        raise LaunchError(f"sagemaker.tuner.strategy={tc.strategy!r}; choose from {STRATEGIES}.")
    ranges = hyperparameter_ranges(cfg)
    if tc.strategy == "Grid" and not all(isinstance(r, CategoricalParameter) for r in ranges.values()):
        raise LaunchError(
            "sagemaker.tuner.strategy=Grid needs categorical parameters only; give every hparams_search.params "
            "entry a choices list, or pick Bayesian, Random or Hyperband."
        )
    metric = objective_metric(cfg)
    strategy_config = None
    early_stopping = tc.early_stopping
    if tc.strategy == "Hyperband":
        # Hyperband stops jobs itself from the per-epoch objective; SageMaker requires early stopping Off. Each
        # printed objective value is an intermediate result (one per validated epoch). The best value so far is
        # fine for it: it compares jobs at equal epochs, and a job's value after r epochs is then its best epoch
        # up to r, the measure the final ranking uses (Auto early stopping's running medians likewise).
        strategy_config = StrategyConfig(HyperbandStrategyConfig(max_resource=cfg.trainer.max_epochs, min_resource=1))
        early_stopping = "Off"
    warm_start = None
    if tc.warm_start_parents:
        warm_start = WarmStartConfig(WarmStartTypes(tc.warm_start_type), parents=set(tc.warm_start_parents))
    return HyperparameterTuner(
        estimator,
        objective_metric_name=metric,
        hyperparameter_ranges=ranges,
        metric_definitions=estimator.metric_definitions,
        strategy=tc.strategy,
        objective_type="Maximize" if cfg.hparams_search.direction == "maximize" else "Minimize",
        max_jobs=None if tc.strategy == "Grid" else tc.max_jobs,
        max_parallel_jobs=tc.max_parallel_jobs,
        early_stopping_type=early_stopping,
        strategy_config=strategy_config,
        warm_start_config=warm_start,
        base_tuning_job_name=cfg.sagemaker.base_job_name,
        random_seed=tc.random_seed,
    )


def launch_tune(cfg: DictConfig, job_overrides: Sequence[str], session: Any | None = None) -> str:
    """Submit a tuning job over ``hparams_search``; return its name."""
    _required(cfg.sagemaker, "role")  # before uploading anything
    session = session or make_session(cfg.sagemaker)
    tuned = set(cfg.hparams_search.params)
    static = [o for o in job_overrides if o.split("=", 1)[0].lstrip("+~") not in tuned]
    inputs = channels(cfg, session)
    with source_dir() as code:
        tuner = make_tuner(cfg, make_estimator(cfg, session, static, code, for_tuning=True))
        tuner.fit(inputs or None, wait=bool(cfg.sagemaker.wait))
    name = tuner.latest_tuning_job.name
    log.info(
        "Tuning job %s submitted; afterwards: launch_sagemaker.py analytics sagemaker.analytics.tuning_job=%s",
        name,
        name,
    )
    return name


def deploy(cfg: DictConfig, session: Any | None = None) -> str:
    """Deploy a training job's ``model.tar.gz`` behind an endpoint with the serving handlers; return its name."""
    from sagemaker.pytorch import PyTorchModel

    from dogbreed.serve.package import write_code

    sm = cfg.sagemaker
    session = session or make_session(sm)
    model_data = sm.deploy.model_data
    if not model_data:
        if not sm.deploy.training_job:
            raise LaunchError("set sagemaker.deploy.training_job=<job name> or sagemaker.deploy.model_data=s3://...")
        job = session.sagemaker_client.describe_training_job(TrainingJobName=sm.deploy.training_job)
        model_data = job["ModelArtifacts"]["S3ModelArtifacts"]
    with tempfile.TemporaryDirectory(prefix="dogbreed-serve-") as tmp:
        # the training job's model.tar.gz holds model/ only; the SDK repacks it with this code/ folder
        write_code(Path(tmp), "eager")
        model = PyTorchModel(
            model_data=model_data,
            role=_required(sm, "role"),
            entry_point="inference.py",
            source_dir=tmp,
            framework_version=str(sm.framework_version),
            py_version=sm.py_version,
            sagemaker_session=session,
            enable_network_isolation=bool(sm.network_isolation),
        )
        model.deploy(
            initial_instance_count=sm.deploy.initial_instance_count,
            instance_type=sm.deploy.instance_type,
            endpoint_name=sm.deploy.endpoint_name,
            wait=bool(sm.wait),
        )
    name = model.endpoint_name
    log.info(
        "Endpoint %s is being created. Query it with:\n  aws sagemaker-runtime invoke-endpoint --endpoint-name %s "
        "--content-type image/jpeg --body fileb://dog.jpg /dev/stdout",
        name, name,
    )  # fmt: skip
    return name


def analytics(cfg: DictConfig, session: Any | None = None) -> Path:
    """Save the tuning job's per-job table as CSV and plot the objective against each hyperparameter."""
    from sagemaker.analytics import HyperparameterTuningJobAnalytics

    sm = cfg.sagemaker
    if not sm.analytics.tuning_job:
        raise LaunchError("set sagemaker.analytics.tuning_job=<tuning job name>.")
    session = session or make_session(sm)
    frame = HyperparameterTuningJobAnalytics(sm.analytics.tuning_job, sagemaker_session=session).dataframe()
    out = Path(sm.analytics.output_dir) / sm.analytics.tuning_job
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "jobs.csv", index=False)
    plot_tuning_jobs(frame, list(cfg.hparams_search.params), out / "jobs.png")
    log.info("%d training jobs: %s", len(frame), out / "jobs.csv")
    return out / "jobs.csv"


def plot_tuning_jobs(frame: Any, params: list[str], path: Path) -> None:
    """Objective over job start time, and against each tuned hyperparameter (log axes where positive)."""
    import matplotlib
    import pandas as pd

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = [p for p in params if p in frame.columns]
    done = frame.dropna(subset=["FinalObjectiveValue"])
    fig, axes = plt.subplots(1, 1 + len(params), figsize=(4 * (1 + len(params)), 3.5), squeeze=False)
    axes = axes[0]
    axes[0].plot(range(len(done)), done["FinalObjectiveValue"].cummax(), drawstyle="steps-post", label="best so far")
    axes[0].scatter(range(len(done)), done["FinalObjectiveValue"], s=12, label="job")
    axes[0].set(xlabel="job (by start time)", ylabel="objective", title="tuning history")
    axes[0].legend()
    for ax, name in zip(axes[1:], params, strict=True):
        # categorical values come back JSON-encoded ('"32"'), as the framework estimator sent them
        values = pd.to_numeric(done[name].astype(str).str.strip('"'), errors="coerce")
        ax.scatter(values, done["FinalObjectiveValue"], s=12)
        if (values > 0).all() and values.max() / max(values.min(), 1e-30) > 20:
            ax.set_xscale("log")
        ax.set(xlabel=name, ylabel="objective")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


COMMANDS = ("train", "tune", "deploy", "analytics")


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
    return analytics(cfg)
