"""Experiment tracking with MLflow: one MLflow run per training run dir, one parent run per tuning study.

``logger=mlflow`` builds :class:`MLflowRunLogger`, Lightning's ``MLFlowLogger`` bound to a run dir:

- the composed config as params under the names users type (``model.lr``, not Lightning's ``model/lr``);
- every metric the CSV logger gets, at the same steps (Lightning hands both loggers the same calls);
- the run id kept in ``<run dir>/mlflow-run.json``, so ``resume=RUN_DIR`` continues the same MLflow run
  (Lightning's logger would start a new one);
- tags: the git commit of the folder the run started in, dogbreed's version and, once the data is indexed,
  the data's digest; at the end the run's results as artefacts (:meth:`MLflowRunLogger.log_run_dir`).

Tuning (:func:`study_parent_run`) opens one parent run per study, kept in the study itself so that every
process of a shared study logs under the same parent; each trial's run is its child (MLflow's
``mlflow.parentRunId`` tag) and is tagged with the trial's number and final state.

The tracking server comes from ``logger.mlflow.tracking_uri`` or ``MLFLOW_TRACKING_URI`` (``http://...``,
``sqlite:///...``, or a SageMaker managed MLflow ARN with the ``sagemaker-mlflow`` plugin installed); with
neither, MLflow's own default (``mlflow.db`` in the working folder). Needs the ``mlflow`` extra; nothing here
imports mlflow before a logger or a parent run is created.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

import dogbreed
from dogbreed._io import read_json, write_json
from dogbreed.rundir import CONFUSION_CSV, CONFUSION_PNG, DATA_REPORT, METRICS, MLFLOW_RUN, REPORT_DIR, trial_dir

log = logging.getLogger(__name__)

PARENT_RUN_TAG = "mlflow.parentRunId"  # what MLflow's UI nests child runs by
GIT_COMMIT_TAG = "mlflow.source.git.commit"
DATA_DIGEST_TAG = "dogbreed.data_digest"
TRIAL_TAG = "optuna.trial"
TRIAL_STATE_TAG = "optuna.trial.state"
PARENT_RUN_ATTR = "mlflow_parent_run_id"  # the study's user attribute that holds its parent run
# MLflow keeps param values up to 6000 characters; longer ones (a long list) are cut with a marker
MAX_PARAM_CHARS = 6000


class _ArnHeaderPluginNoise(logging.Filter):
    """Drop the warning ``sagemaker-mlflow`` 0.5's header plugin causes on every request to a server that is not
    a SageMaker ARN (it parses any tracking URI as an ARN and fails with an ``IndexError``, which MLflow logs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("resolving request headers" in message and "list index out of range" in message)


def _quiet_header_plugin(tracking_uri: str | None) -> None:
    if tracking_uri and not tracking_uri.startswith("arn:"):
        registry = logging.getLogger("mlflow.tracking.request_header.registry")
        if not any(isinstance(f, _ArnHeaderPluginNoise) for f in registry.filters):
            registry.addFilter(_ArnHeaderPluginNoise())


def flat_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"lr": 1e-3}}`` -> ``{"model.lr": 1e-3}``: the config's leaves under the names users type."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flat_params(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def git_commit(folder: str | Path = ".") -> str | None:
    """The commit checked out in ``folder``, or None outside a git work tree (or without git)."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


class MLflowRunLogger(MLFlowLogger):
    """Lightning's MLflow logger for one run dir (see the module docstring).

    Args:
        run_dir: The run dir; ``mlflow-run.json`` there names the MLflow run to continue.
        experiment_name: MLflow experiment of the run (created on first use).
        tracking_uri: Tracking server; ``None`` reads ``MLFLOW_TRACKING_URI``, else MLflow's own default (a
            ``mlflow.db`` in the working folder, where ``mlflow ui`` looks).
        run_name: MLflow run name (default: MLflow's generated one).
        parent_run_id: Nest this run under that one (a tuning trial under its study).
        tags: More tags for a new run.
    """

    def __init__(
        self,
        run_dir: str | Path,
        experiment_name: str = "dogbreed",
        tracking_uri: str | None = None,
        run_name: str | None = None,
        parent_run_id: str | None = None,
        tags: Mapping[str, Any] | None = None,
    ) -> None:
        import mlflow

        self.run_dir = Path(run_dir)
        tracking_uri = tracking_uri or mlflow.get_tracking_uri()  # MLFLOW_TRACKING_URI, else MLflow's default
        _quiet_header_plugin(tracking_uri)
        saved = read_json(self.run_dir / MLFLOW_RUN) or {}
        run_id = saved.get("run_id") if saved.get("tracking_uri") == tracking_uri else None
        if saved and run_id is None:
            log.warning(
                "%s names MLflow run %s on %s, not on %s: starting a new MLflow run.",
                self.run_dir / MLFLOW_RUN, saved.get("run_id"), saved.get("tracking_uri"), tracking_uri,
            )  # fmt: skip
        all_tags = {"dogbreed.version": dogbreed.__version__, **(tags or {})}
        if commit := git_commit():
            all_tags[GIT_COMMIT_TAG] = commit
        if parent_run_id:
            all_tags[PARENT_RUN_TAG] = parent_run_id
        super().__init__(
            experiment_name=experiment_name, run_name=run_name, tracking_uri=tracking_uri, tags=all_tags, run_id=run_id
        )

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        """Log the composed config under dotted names, skipping what the run already holds (a resumed run).

        MLflow refuses to change a param's value, so a value changed on resume (``trainer.max_epochs`` raised to
        train longer) is kept as the tag ``changed.<name>`` instead, with a warning.
        """
        from mlflow.entities import Param, RunTag

        given = flat_params(params if isinstance(params, Mapping) else vars(params))
        flat = {key: _param_value(value) for key, value in given.items()}
        logged = self.experiment.get_run(self.run_id).data.params
        new = [Param(k, v) for k, v in flat.items() if k not in logged]
        changed = [RunTag(f"changed.{k}", v) for k, v in flat.items() if k in logged and logged[k] != v]
        if changed:
            log.warning("MLflow params cannot change; new values kept as tags: %s", [t.key for t in changed])
        for start in range(0, max(len(new), len(changed)), 100):  # MLflow takes at most 100 params per batch
            self.experiment.log_batch(self.run_id, params=new[start : start + 100], tags=changed[start : start + 100])
        write_json(self.run_dir / MLFLOW_RUN, {"run_id": self.run_id, "tracking_uri": self._tracking_uri})

    @rank_zero_only
    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self.experiment.set_tag(self.run_id, key, str(value))

    @rank_zero_only
    def log_run_dir(self, output_dir: str | Path, model_dir: str | Path, *, data_digest: str | None = None) -> None:
        """Upload the run's results: ``model/``, ``metrics.json``, the confusion matrix, ``report/`` and
        ``data-report.json`` (whichever exist), and tag the data's digest."""
        output_dir = Path(output_dir)
        if data_digest:
            self.set_tags({DATA_DIGEST_TAG: data_digest})
        if Path(model_dir).is_dir():
            self.experiment.log_artifacts(self.run_id, str(model_dir), "model")
        if (output_dir / REPORT_DIR).is_dir():
            self.experiment.log_artifacts(self.run_id, str(output_dir / REPORT_DIR), REPORT_DIR)
        for name in (METRICS, CONFUSION_CSV, CONFUSION_PNG, DATA_REPORT):
            if (output_dir / name).is_file():
                self.experiment.log_artifact(self.run_id, str(output_dir / name))
        log.info("MLflow run %s on %s: params, metrics and artefacts logged", self.run_id, self._tracking_uri)


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 12] + "...(cut)"


def study_parent_run(study: Any, *, experiment_name: str, tracking_uri: str | None, params: Mapping[str, Any]) -> str:
    """The id of the study's MLflow parent run, created by the first process that asks and kept in the study.

    ``params`` (the search space and tuning settings) are logged on the parent when it is created.
    """
    existing = study.user_attrs.get(PARENT_RUN_ATTR)
    if existing:
        return existing
    client = _client(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(experiment_name)
    tags = {"mlflow.runName": f"study {study.study_name}", "optuna.study": study.study_name}
    if commit := git_commit():
        tags[GIT_COMMIT_TAG] = commit
    run_id = client.create_run(experiment_id, tags=tags).info.run_id
    for key, value in flat_params(params).items():
        client.log_param(run_id, key, _param_value(value))
    study.set_user_attr(PARENT_RUN_ATTR, run_id)
    return run_id


def record_trial(study: Any, trial: Any, *, tracking_uri: str | None, tune_dir: Path) -> None:
    """After a trial: tag its child run with the trial's number and state, and the parent with the best trial.

    Pruned and failed trials end as MLflow runs ``KILLED`` and ``FAILED`` (Lightning's logger marks a run that
    raised, as a pruned trial does, ``FAILED`` first).
    """
    client = _client(tracking_uri)
    if child := _run_id(trial_dir(tune_dir, trial.number)):
        client.set_tag(child, TRIAL_TAG, str(trial.number))
        client.set_tag(child, TRIAL_STATE_TAG, trial.state.name)
        client.set_terminated(child, {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}.get(trial.state.name, "FAILED"))
    parent = study.user_attrs.get(PARENT_RUN_ATTR)
    if parent and study.get_trials(deepcopy=False, states=(trial.state.COMPLETE,)):
        best = study.best_trial
        client.set_tag(parent, "best_trial", str(best.number))
        client.set_tag(parent, "best_value", repr(best.value))
        if best_run := _run_id(trial_dir(tune_dir, best.number)):
            client.set_tag(parent, "best_run_id", best_run)


def _client(tracking_uri: str | None) -> Any:
    """An ``MlflowClient`` of ``tracking_uri`` (None: ``MLFLOW_TRACKING_URI``, else MLflow's default)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    _quiet_header_plugin(client.tracking_uri)
    return client


def _run_id(run_dir: Path) -> str | None:
    return (read_json(run_dir / MLFLOW_RUN) or {}).get("run_id")
