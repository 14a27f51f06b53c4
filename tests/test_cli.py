"""The ``dogbreed`` command: its help lists every job without importing torch, and each subcommand runs the
same ``main`` as its ``dogbreed-*`` script, with the same arguments."""

from __future__ import annotations

import logging
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from omegaconf import DictConfig

from dogbreed.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]
# what pip installed from pyproject.toml's [project.scripts]
SCRIPTS = {e.name: e.value for e in entry_points(group="console_scripts") if e.name.startswith("dogbreed")}
DOGBREED = Path(sys.executable).parent / "dogbreed"  # the console script pip installed beside this Python


def _run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_console_script_is_installed() -> None:
    assert SCRIPTS["dogbreed"] == "dogbreed.cli:main"
    assert DOGBREED.exists(), f"{DOGBREED} missing: pip install -e . installs the dogbreed script"


def test_help_lists_every_subcommand_on_one_line() -> None:
    result = _run(str(DOGBREED), "--help")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for name, command in COMMANDS.items():
        assert [line for line in lines if line.split()[:1] == [name]] == [f"  {name:<9}  {command.summary}"]
    assert set(COMMANDS) == {"train", "tune", "data", "report", "package", "serve", "predict", "sagemaker"}


def test_help_does_not_import_torch() -> None:
    """``dogbreed --help`` answers at once: nothing behind the subcommands is imported until one is chosen."""
    code = (
        "import sys\nfrom dogbreed.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "heavy = sorted(m for m in ('torch', 'lightning', 'hydra', 'numpy') if m in sys.modules)\n"
        "print('imported:', heavy)"
    )
    result = _run(sys.executable, "-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("imported: []"), result.stdout


@pytest.mark.parametrize("name", list(COMMANDS))
def test_subcommand_runs_the_scripts_main(name: str) -> None:
    """``dogbreed NAME`` and ``dogbreed-NAME`` are the same function, so their flags cannot drift apart."""
    assert SCRIPTS[f"dogbreed-{name}"] == COMMANDS[name].target


@pytest.mark.slow
@pytest.mark.parametrize("name", list(COMMANDS))
def test_subcommand_help_is_the_jobs_own(name: str) -> None:
    words = ["stage"] if name == "data" else []  # the data tool's verbs have their own --help
    result = _run(str(DOGBREED), name, *words, "--help")
    script = _run(str(Path(sys.executable).parent / f"dogbreed-{name}"), *words, "--help")
    assert result.returncode == 0 == script.returncode, result.stderr + script.stderr
    # the same text but for the program's name, which argparse and Hydra take from argv[0]
    assert len(result.stdout.splitlines()) == len(script.stdout.splitlines()) > 1, (result.stdout, script.stdout)


@pytest.mark.slow
def test_subcommand_passes_hydra_overrides() -> None:
    result = _run(str(DOGBREED), "train", "--cfg", "job", "experiment=demo", "model.lr=0.0123")
    assert result.returncode == 0, result.stderr
    assert "lr: 0.0123" in result.stdout


@pytest.mark.slow
def test_subcommand_exit_status_is_the_jobs(tmp_path: Path) -> None:
    """A job's error status comes back through the dispatcher (data check of a missing folder: 2)."""
    result = _run(str(DOGBREED), "data", "check", str(tmp_path / "missing"))
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    ok = _run(str(DOGBREED), "data", "check", "dogbreed/demo_data")
    assert ok.returncode == 0, ok.stderr
    assert "10 classes" in ok.stdout


def test_python_m_dogbreed_is_the_same_command() -> None:
    result = _run(sys.executable, "-m", "dogbreed", "--help")
    assert result.returncode == 0 and "sagemaker" in result.stdout, result.stderr


def test_unknown_or_missing_command_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["trian"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "dogbreed: unknown command 'trian'; choose one of train, tune, data, report, package, serve, predict, "
        "sagemaker (dogbreed --help)"
    )
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "usage: dogbreed COMMAND" in capsys.readouterr().err


def test_training_run_ends_with_where_to_look(demo_cfg: DictConfig, caplog: pytest.LogCaptureFixture) -> None:
    """A newcomer is told the run dir, the report and the command that packages the model."""
    from dogbreed.train import train

    with caplog.at_level(logging.INFO, logger="dogbreed.train"):
        train(demo_cfg)
    run_dir = demo_cfg.paths.output_dir
    lines = [r.getMessage() for r in caplog.records if r.name == "dogbreed.train"]
    assert lines[-3:] == [
        f"Run dir: {run_dir}",
        f"Report:  none (build it with: dogbreed report {run_dir})",  # the small config turns the report off
        f"Next:    dogbreed package {run_dir} -o model.tar.gz && dogbreed serve model.tar.gz",
    ]
    assert (Path(run_dir) / "model" / "model.pt").is_file()
