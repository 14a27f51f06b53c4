"""The README's commands stay true: every training, tuning and launcher command composes, every script flag exists.

Commands are read from the README's ``bash`` blocks as a user would copy them. Training and tuning commands
are composed with their overrides (what ``--cfg job`` does: a wrong key, group or value type fails here);
CLI commands are checked against their own ``--help``. Commands that need AWS, a GPU or minutes of training
are composed or checked, not run; the Quick start ones run in CI itself.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from dogbreed.config import compose_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

CONFIG_OF = {
    ("python", "-m", "dogbreed.train"): "train", ("dogbreed-train",): "train",
    ("python", "-m", "dogbreed.tune"): "tune", ("dogbreed-tune",): "tune",
    ("python", "scripts/launch_sagemaker.py"): "launch_sagemaker", ("dogbreed-sagemaker",): "launch_sagemaker",
}  # fmt: skip
CLI_OF = {
    ("python", "-m", "dogbreed.package"): [sys.executable, "-m", "dogbreed.package"],
    ("dogbreed-package",): [sys.executable, "-m", "dogbreed.package"],
    ("python", "-m", "dogbreed.predict"): [sys.executable, "-m", "dogbreed.predict"],
    ("dogbreed-predict",): [sys.executable, "-m", "dogbreed.predict"],
    ("python", "-m", "dogbreed.serve"): [sys.executable, "-m", "dogbreed.serve"],
    ("dogbreed-serve",): [sys.executable, "-m", "dogbreed.serve"],
    ("python", "-m", "dogbreed.report"): [sys.executable, "-m", "dogbreed.report"],
    ("python", "-m", "dogbreed.data"): [sys.executable, "-m", "dogbreed.data"],
}
# commands whose words are not dogbreed's (shell, pip, other tools)
OTHER = ("python3", "pip", ".", "xdg-open", "open", "apt-get", "mlflow")
TEST_COMMAND = ["python", "-m", "pytest"]  # the README's test command, which CI runs as written


def readme_commands() -> list[list[str]]:
    """Each command of every ``bash`` block: continuation lines joined, comments dropped, split at ``&&``."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words: list[str] = []
            for word in [*shlex.split(line, comments=True), "&&"]:
                if word != "&&":
                    words.append(word)
                    continue
                if words[:1] == ["flock"]:
                    words = words[2:]
                if words:
                    commands.append(words)
                words = []
    return commands


def match(words: list[str], table: dict[tuple[str, ...], object]) -> tuple[object, list[str]] | None:
    for prefix, value in table.items():
        if tuple(words[: len(prefix)]) == prefix:
            return value, words[len(prefix) :]
    return None


COMMANDS = readme_commands()
COMPOSED = [(c, *match(c, CONFIG_OF)) for c in COMMANDS if match(c, CONFIG_OF)]
SCRIPTS = [c for c in COMMANDS if c[0] == "python" and c[1].startswith("scripts/") and not match(c, CONFIG_OF)]
CLIS = [(c, *match(c, CLI_OF)) for c in COMMANDS if match(c, CLI_OF)]


def test_every_readme_command_is_checked() -> None:
    """No command slips past the checks below: each is composed, checked against --help, or someone else's."""
    checked = {id(c) for c, *_ in COMPOSED} | {id(c) for c in SCRIPTS} | {id(c) for c, *_ in CLIS}
    unchecked = [" ".join(c) for c in COMMANDS if id(c) not in checked and c[0] not in OTHER and c != TEST_COMMAND]
    assert not unchecked
    assert len(COMPOSED) >= 15 and len(CLIS) >= 4


def _id(value: object) -> str:
    return " ".join(value) if isinstance(value, list) else ""


@pytest.mark.parametrize(("words", "config", "args"), COMPOSED, ids=_id)
def test_readme_config_command_composes(
    words: list[str], config: str, args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if any("$(" in a or "<" in a or ">" in a for a in args) or "-cd" in args or "--config-dir" in args:
        pytest.skip("needs files a run writes, or a CLI flag (the wheel test runs --config-dir)")
    if any("my_conf" in a for a in args):  # the user's own config dir of the Install section
        (tmp_path / "my_conf" / "experiment").mkdir(parents=True)
        (tmp_path / "my_conf" / "experiment" / "mine.yaml").write_text(
            "# @package _global_\ndefaults:\n  - demo\ntrainer:\n  max_epochs: 1\n"
        )
        monkeypatch.chdir(tmp_path)
    if config == "launch_sagemaker":
        args = args[1:]  # the verb
    overrides = [a for a in args if not a.startswith("-")]
    cfg = compose_config(config, overrides)
    assert cfg.task_name == config


@pytest.mark.parametrize("words", SCRIPTS, ids=lambda c: " ".join(c))
def test_readme_script_flags_exist(words: list[str]) -> None:
    help_text = subprocess.run(
        [sys.executable, str(ROOT / words[1]), "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT
    ).stdout
    flags = [w.split("=")[0] for w in words[2:] if w.startswith("--")]
    assert help_text and all(flag in help_text for flag in flags), (flags, help_text)


@pytest.mark.parametrize(("words", "cli", "args"), CLIS, ids=_id)
def test_readme_cli_flags_exist(words: list[str], cli: list[str], args: list[str]) -> None:
    subcommand = [args[0]] if cli[-1] == "dogbreed.data" else []
    result = subprocess.run([*cli, *subcommand, "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    flags = [w.split("=")[0] for w in args if w.startswith("-")]
    assert all(flag in result.stdout for flag in flags), (flags, result.stdout)


def test_readme_python_snippets_compile_and_import() -> None:
    """Python blocks are valid code, and what they import from dogbreed exists."""
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert blocks
    for block in blocks:
        compile(block, "README.md", "exec")
        for line in block.splitlines():
            if line.startswith(("from dogbreed", "import dogbreed")):
                exec(line, {})
