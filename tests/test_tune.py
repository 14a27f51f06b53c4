"""Local tuning: search-space checks, pruning, resume after an interruption, the best config trains, the report."""

from __future__ import annotations

import base64
import csv
import re
from pathlib import Path

import optuna
import pytest
from omegaconf import DictConfig, OmegaConf, open_dict
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from dogbreed import tune as tune_mod
from dogbreed.config import TuneConfigError, search_space
from dogbreed.config import compose_config as compose
from dogbreed.train import train

from .conftest import compose_config, make_small

GOOD = {"model.lr": 1.0e-3, "model.weight_decay": 1.0e-4, "data.batch_size": 16}
BAD = {"model.lr": 1.0e-5, "model.weight_decay": 1.0e-4, "data.batch_size": 16}
PLOTS = ("optimization_history", "param_importances", "parallel_coordinate")


def trial_rows(html: str) -> dict[int, str]:
    """Trial number -> CSS class of its row in the report's trials table ('' for a plain row)."""
    return {int(n): css for css, n in re.findall(r'<tr(?: class="(\w+)")?><td>(\d+)', html)}


def finished_study(trials: list[tuple[TrialState, float | None, float, int]]) -> optuna.Study:
    """An in-memory study holding the given (state, value, lr, epochs) trials: write_results' input, no training."""
    study = optuna.create_study(study_name="breeds", direction="maximize")
    space = {"model.lr": FloatDistribution(1e-5, 1e-2, log=True), "data.batch_size": CategoricalDistribution([16, 32])}
    for state, value, lr, epochs in trials:
        study.add_trial(
            optuna.trial.create_trial(
                state=state, value=value, params={"model.lr": lr, "data.batch_size": 32}, distributions=space,
                user_attrs={tune_mod.EPOCHS_ATTR: epochs},
            )
        )  # fmt: skip
    return study


def compose_tune(overrides: list[str]) -> DictConfig:
    return compose("tune", overrides)


@pytest.fixture
def tune_cfg(tmp_path: Path) -> DictConfig:
    """The demo tuned for seconds: 2 epochs of 4 batches of 32 px images, half the validation set."""
    cfg = make_small(compose_tune(["experiment=demo"]), tmp_path)
    with open_dict(cfg):
        cfg.trainer.max_epochs = 2
        cfg.trainer.limit_val_batches = 0.5
        cfg.trainer.log_every_n_steps = 1
        cfg.data.image_size = 32
        cfg.data.resize_size = 36
        cfg.tune.update(n_trials=2, n_startup_trials=1, n_warmup_steps=0, pruner="median", heartbeat_interval=None)
        for name in [n for n in cfg.callbacks if n not in ("model_checkpoint", "log_metrics")]:
            cfg.callbacks.pop(name)  # debugger, profiler, ...: not what these tests are about
    return cfg


def test_search_space_is_shared_and_checked(tune_cfg: DictConfig) -> None:
    space = search_space(tune_cfg)
    assert space["model.lr"] == {"type": "float", "low": 1e-5, "high": 1e-2, "log": True}
    assert space["data.batch_size"]["choices"] == [16, 32, 64, 128]
    assert tune_cfg.optimized_metric == "val/acc" and tune_cfg.hparams_search.direction == "maximize"

    bad = tune_cfg.copy()
    bad.hparams_search.params["model.lr"].low = "1e-5"  # what YAML gives for 1e-5 without a dot
    with pytest.raises(TuneConfigError, match=r"model\.lr.*1\.0e-5"):
        search_space(bad)
    bad.hparams_search.params["model.lr"] = {"type": "uniform", "low": 0.1, "high": 1.0}
    with pytest.raises(TuneConfigError, match="float, int or categorical"):
        search_space(bad)
    with pytest.raises(TuneConfigError, match=r"tune\.pruner"):
        tune_mod.make_pruner("sha", n_startup_trials=1, n_warmup_steps=0, max_epochs=2)


def test_trial_config_applies_values(tune_cfg: DictConfig, tmp_path: Path) -> None:
    cfg = tune_mod.trial_config(tune_cfg, GOOD, tmp_path / "t0")
    assert (cfg.model.lr, cfg.data.batch_size, cfg.test) == (1e-3, 16, False)
    assert cfg.paths.checkpoint_dir == str(tmp_path / "t0" / "checkpoints")
    assert "tune" not in cfg and "hparams_search" not in cfg


@pytest.mark.slow
def test_tune_prunes_resumes_and_best_config_trains(tune_cfg: DictConfig, tmp_path: Path) -> None:
    out = Path(tune_cfg.paths.output_dir)
    out.mkdir(parents=True)
    # a good trial, then one whose lr is too small to learn in 8 steps: the median pruner stops it
    study = optuna.create_study(
        study_name=tune_cfg.tune.study_name, storage=f"sqlite:///{out / 'study.db'}", direction="maximize"
    )
    study.enqueue_trial(GOOD)
    study.enqueue_trial(BAD)
    study = tune_mod.tune(tune_cfg)
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED]
    assert study.trials[1].user_attrs["epochs"] == 1

    # an interrupted run (Ctrl-C during a trial) leaves a failed trial; the next run finishes the study
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with open_dict(tune_cfg):
        tune_cfg.tune.n_trials = 3
    with pytest.raises(KeyboardInterrupt):
        tune_mod.tune(tune_cfg, run=interrupted)
    study = tune_mod.tune(tune_cfg)
    counts = {s: sum(t.state == s for t in study.trials) for s in optuna.trial.TrialState}
    assert counts[optuna.trial.TrialState.FAIL] == 1
    assert counts[optuna.trial.TrialState.COMPLETE] + counts[optuna.trial.TrialState.PRUNED] == 3

    with open(out / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["state"] for r in rows][:3] == ["COMPLETE", "PRUNED", "FAIL"]
    assert rows[0]["epochs"] == "2" and float(rows[0]["duration_s"]) > 0 and rows[0]["model.lr"] == "0.001"
    assert float(rows[1]["objective"]) == study.trials[1].intermediate_values[1]  # pruned after its first epoch
    assert {"optimization_history.png", "parallel_coordinate.png"} <= {p.name for p in (out / "plots").iterdir()}
    report = (out / "report" / "tuning-report.html").read_text()
    assert report.count('src="data:image/png;base64,') == len(list((out / "plots").glob("*.png")))
    rows = trial_rows(report)
    assert list(rows) == [t.number for t in study.trials] and rows[study.best_trial.number] == "best"
    assert (rows[1], rows[2]) == ("pruned", "failed")

    best = OmegaConf.load(out / "tuned" / "best.yaml")
    assert best.model.lr == study.best_params["model.lr"]
    overrides = (out / "best_overrides.txt").read_text().split()
    assert f"model.lr={study.best_params['model.lr']}" in overrides
    assert f"<pre>python -m dogbreed.train {' '.join(overrides)}</pre>" in report
    final = make_small(compose_config(["experiment=demo", *overrides]), tmp_path / "final")
    with open_dict(final):
        final.data.image_size, final.data.resize_size = 32, 36
    assert final.model.lr == study.best_params["model.lr"]
    train(final)
    assert (tmp_path / "final" / "run" / "model" / "model.pt").is_file()


def test_results_end_with_the_tuning_report(tmp_path: Path) -> None:
    study = finished_study(
        [(TrialState.COMPLETE, 0.5, 1e-3, 2), (TrialState.COMPLETE, 0.75, 2e-3, 2), (TrialState.PRUNED, None, 1e-5, 1),
         (TrialState.FAIL, None, 1e-4, 0)]
    )  # fmt: skip
    tune_mod.write_results(study, tmp_path, base_overrides=["experiment=demo"], metric="val/acc")
    html = (tmp_path / "report" / "tuning-report.html").read_text()

    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    plots = [tmp_path / "plots" / f"{name}.png" for name in PLOTS]
    embedded = [f"data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}" for p in plots]
    assert re.findall(r'<img[^>]*src="([^"]*)"', html) == embedded
    assert not re.search(r'(src|href)="(https?:|/|\.\./)', html)  # opens offline: nothing to fetch
    assert trial_rows(html) == {0: "", 1: "best", 2: "pruned", 3: "failed"}
    assert '<tr class="best"><td>1 (best)</td><td>COMPLETE</td><td>0.7500</td>' in html
    assert "<td>trials</td><td>4 (2 complete, 1 pruned, 1 failed)</td>" in html
    assert "<td>epochs spent (all trials)</td><td>5</td>" in html and "objective (val/acc)" in html
    assert (tmp_path / "best_overrides.txt").read_text().split() == [
        "experiment=demo",
        "data.batch_size=32",
        "model.lr=0.002",
    ]
    assert "<pre>python -m dogbreed.train experiment=demo data.batch_size=32 model.lr=0.002</pre>" in html


@pytest.mark.parametrize(
    "trials", [[], [(TrialState.PRUNED, None, 1e-5, 1), (TrialState.FAIL, None, 1e-4, 0)]], ids=["none", "no-complete"]
)
def test_tuning_report_renders_before_a_trial_completed(tmp_path: Path, trials: list) -> None:
    tune_mod.write_results(finished_study(trials), tmp_path, metric="val/acc")
    html = (tmp_path / "report" / "tuning-report.html").read_text()
    assert "No trial has completed yet" in html and "python -m dogbreed.train" not in html
    assert "<img" not in html and html.count("Not drawn") == len(PLOTS)
    assert list(trial_rows(html)) == list(range(len(trials)))


@pytest.mark.filterwarnings("ignore:Attempting to set identical low and high ylims")  # one batch size
@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_parallel_coordinates_draw_every_trial_visibly(tmp_path: Path, direction: str) -> None:
    """Optuna draws the worst trial white on its light-grey background; every line must stand out from it."""
    from matplotlib.collections import LineCollection
    from matplotlib.colors import to_rgb
    from optuna.visualization import matplotlib as ovm

    from dogbreed.report.tuning import readable_parallel_coordinate

    def luminance(rgb: tuple[float, ...]) -> float:
        linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb[:3]]
        return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]

    study = optuna.create_study(direction=direction)  # minimize reverses Optuna's colour scale
    study.add_trials(finished_study([(TrialState.COMPLETE, v, lr, 2) for v, lr in [(0.05, 1e-5), (0.5, 1e-3),
                                                                                   (0.9, 2e-3)]]).trials)  # fmt: skip
    ax = readable_parallel_coordinate(ovm.plot_parallel_coordinate(study))
    lines = next(c for c in ax.collections if isinstance(c, LineCollection))
    background = luminance(to_rgb(ax.get_facecolor()))
    colours = lines.to_rgba(lines.get_array())
    contrast = [(background + 0.05) / (luminance(c) + 0.05) for c in colours]
    assert min(contrast) > 1.6, contrast  # Optuna's own: about 1, the worst trial as light as the background

    tune_mod.write_results(study, tmp_path, metric="val/acc")  # the PNG the report embeds is drawn this way
    assert (tmp_path / "plots" / "parallel_coordinate.png").is_file()
