"""Each extra on its own: the hiding that tests/test_installed.py runs every installed command under.

A subprocess's ``sitecustomize`` (tests/installed.py) hides the packages of the extras a command does not
need, from imports and from ``importlib.metadata`` alike (as if never installed), so a stray import of
Optuna, the SageMaker SDK or the serving stack fails the test instead of passing on a developer's full install.
The installed wheel's commands, each with only its own extra, are in tests/test_installed.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .installed import hidden_except, hiding

ROOT = Path(__file__).resolve().parents[1]


def env_with(tmp: Path, hidden: dict[str, str]) -> dict[str, str]:
    """The current environment plus the hiding ``sitecustomize``."""
    return {**os.environ, **hiding(tmp / "hide", hidden)}


def run(cmd: list[str], *, env: dict[str, str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (
        f"{cmd} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    )
    return result


def test_hidden_packages_look_uninstalled(tmp_path: Path) -> None:
    """The hiding itself: a hidden package is neither importable nor in the metadata; the others are both."""
    probe = (
        "import importlib.util as u, importlib.metadata as m; print(u.find_spec('optuna'), "
        "u.find_spec('json') is not None, 'optuna' in {d.metadata['Name'] for d in m.distributions()}, "
        "m.version('torch'))"
    )
    out = run([sys.executable, "-c", probe], env=env_with(tmp_path, {"optuna": "optuna"}), cwd=tmp_path)
    assert out.stdout.split()[:3] == ["None", "True", "False"]
    failed = subprocess.run(
        [sys.executable, "-c", "import optuna"], env=env_with(tmp_path, {"optuna": "optuna"}), capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert "ModuleNotFoundError: No module named 'optuna'" in failed.stderr


def test_readme_names_each_extra_install_line() -> None:
    """The README's install table lists exactly the extras whose commands the tests below run alone."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Install", 1)[1].split("\n## ", 1)[0]
    extras = set(re.findall(r'pip install -e "\.\[(\w+)\]" -c constraints.txt', section))
    assert extras == {"serve", "tune", "sagemaker", "mlflow"}
    assert "pip install -e . -c constraints.txt" in section and "pip wheel --no-deps -w dist ." in section


def test_launcher_errors_are_one_line_without_optuna(tmp_path: Path) -> None:
    """A launcher configuration mistake is one line and exit code 2, with only the SageMaker extra."""
    result = subprocess.run(
        [sys.executable, "-m", "dogbreed.sagemaker", "train", "sagemaker.bucket=b"],
        env=env_with(tmp_path, hidden_except("sagemaker")), cwd=tmp_path, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert "sagemaker.role is not set" in result.stderr and "Traceback" not in result.stderr


def test_launcher_help_is_usage_not_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    from dogbreed.sagemaker.__main__ import main

    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: dogbreed-sagemaker {train,tune,deploy,transform,analytics}") and "ERROR" not in out
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2 and "usage:" in capsys.readouterr().err
