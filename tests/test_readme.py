"""The README's and the documentation's commands, paths and links stay true.

Commands are read from the ``bash`` blocks of ``README.md`` and ``docs/*.md`` as a user would copy them.
Training, tuning and SageMaker commands are composed with their overrides (what ``--cfg job`` does: a wrong
key, group or value type fails here); commands that read files a run writes (``$(cat best_overrides.txt)``,
``--config-dir``, ``resume=RUN_DIR``) are composed after those files are made by the code that writes them.
CLI commands are checked against their own ``--help``. Commands that need AWS, a GPU or minutes of training
are composed or checked, not run; the Quick start ones run in CI itself. Every repository path the pages name
exists, and the README's links land on a page and heading of ``docs/``.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dogbreed.cli import usage
from dogbreed.config import compose_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PAGES = {"README.md": README} | {f"docs/{p.name}": p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))}

CONFIG_OF = {
    ("python", "-m", "dogbreed.train"): "train", ("dogbreed-train",): "train", ("dogbreed", "train"): "train",
    ("python", "-m", "dogbreed.tune"): "tune", ("dogbreed-tune",): "tune", ("dogbreed", "tune"): "tune",
    ("python", "scripts/launch_sagemaker.py"): "launch_sagemaker", ("dogbreed-sagemaker",): "launch_sagemaker",
    ("dogbreed", "sagemaker"): "launch_sagemaker",
}  # fmt: skip
CLI_OF = {
    **{
        prefix: [sys.executable, "-m", f"dogbreed.{name}"]
        for name in ("package", "predict", "serve", "report", "data")
        for prefix in (("python", "-m", f"dogbreed.{name}"), (f"dogbreed-{name}",), ("dogbreed", name))
    },
    ("dogbreed",): [sys.executable, "-m", "dogbreed"],  # last: `dogbreed --help` itself
}
# commands whose words are not dogbreed's (shell, pip, other tools)
OTHER = ("python3", "pip", ".", "xdg-open", "open", "apt-get", "mlflow", "mkdocs", "docker", "aws")
TEST_COMMAND = ["python", "-m", "pytest"]  # the README's test command, which CI runs as written


def bash_commands(text: str) -> list[list[str]]:
    """Each command of every ``bash`` block: continuation lines joined, comments dropped, split at ``&&``."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
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


COMMANDS = [(page, c) for page, text in PAGES.items() for c in bash_commands(text)]
COMPOSED = [(p, c, *match(c, CONFIG_OF)) for p, c in COMMANDS if match(c, CONFIG_OF)]
SCRIPTS = [(p, c) for p, c in COMMANDS if c[0] == "python" and c[1].startswith("scripts/") and not match(c, CONFIG_OF)]
CLIS = [(p, c, *match(c, CLI_OF)) for p, c in COMMANDS if match(c, CLI_OF) and not match(c, CONFIG_OF)]


def _id(value: object) -> str:
    return " ".join(value) if isinstance(value, list) else str(value) if isinstance(value, str) else ""


def test_every_command_is_checked() -> None:
    """No command slips past the checks below: each is composed, checked against --help, or someone else's."""
    checked = {id(c) for _, c, *_ in COMPOSED} | {id(c) for _, c in SCRIPTS} | {id(c) for _, c, *_ in CLIS}
    unchecked = [
        f"{page}: {' '.join(c)}"
        for page, c in COMMANDS
        if id(c) not in checked and c[0] not in OTHER and c != TEST_COMMAND
    ]
    assert not unchecked
    assert len(COMPOSED) >= 40 and len(CLIS) >= 15 and {p for p, *_ in COMPOSED} >= {"README.md", "docs/tuning.md"}


@pytest.fixture
def written_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working folder holding what the commands read: made by the code that writes it, or as Hydra writes it."""
    import optuna  # the tune extra, which [dev] installs: a broken install fails here rather than skips

    from dogbreed.tune import write_best

    monkeypatch.chdir(tmp_path)
    study = optuna.create_study(study_name="dogbreed", direction="maximize")
    study.add_trial(
        optuna.trial.create_trial(
            params={"model.lr": 0.002, "data.batch_size": 32}, value=0.8,
            distributions={"model.lr": optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True),
                           "data.batch_size": optuna.distributions.CategoricalDistribution([16, 32, 64, 128])},
        )
    )  # fmt: skip
    tune_dir = tmp_path / "outputs" / "tune" / "dogbreed"
    tune_dir.mkdir(parents=True)
    write_best(study, tune_dir, base_overrides=["experiment=demo"])  # best_overrides.txt and tuned/best.yaml
    (tmp_path / "best_overrides.txt").write_text((tune_dir / "best_overrides.txt").read_text())
    # a user's own config folder (Configuration: "Your own configs")
    (tmp_path / "my_conf" / "experiment").mkdir(parents=True)
    (tmp_path / "my_conf" / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - demo\ntrainer:\n  max_epochs: 1\n"
    )
    return tmp_path


def expand(args: list[str], folder: Path) -> Iterator[str]:
    """The overrides a shell and the CLI would hand Hydra: ``$(cat F)`` read, ``--config-dir D`` a search path."""
    words = iter(args)
    for word in words:
        if word == "$(cat":
            yield from (folder / next(words).removesuffix(")")).read_text().split()
        elif word in ("-cd", "--config-dir"):
            yield f"hydra.searchpath=[file://{(folder / next(words)).resolve()}]"
        else:
            yield word


def resumed(overrides: list[str], folder: Path) -> list[str]:
    """``resume=RUN_DIR`` as ``python -m dogbreed.train`` turns it into overrides, on a run dir as Hydra leaves one."""
    from dogbreed.train import resume_overrides

    resume = [o for o in overrides if o.startswith("resume=")]
    if not resume:
        return overrides
    run_dir = folder / resume[-1].removeprefix("resume=")
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("- experiment=demo\n- model.lr=0.002\n")
    return resume_overrides(run_dir, [o for o in overrides if o not in resume])


@pytest.mark.parametrize(("page", "words", "config", "args"), COMPOSED, ids=_id)
def test_config_command_composes(
    page: str, words: list[str], config: str, args: list[str], written_files: Path
) -> None:
    assert not any("<" in a or ">" in a for a in args), f"{page}: write a concrete value, not a <placeholder>"
    if config == "launch_sagemaker":
        args = args[1:]  # the verb
    overrides = resumed([a for a in expand(args, written_files) if not a.startswith("-")], written_files)
    cfg = compose_config(config, overrides)
    assert cfg.task_name == config
    if any(a.startswith("$(cat") for a in args) or "+tuned=best" in args:  # what the tuner wrote reached the config
        assert cfg.model.lr == 0.002 and cfg.data.batch_size == 32


@pytest.mark.parametrize(("page", "words"), SCRIPTS, ids=_id)
def test_script_flags_exist(page: str, words: list[str]) -> None:
    help_text = subprocess.run(
        [sys.executable, str(ROOT / words[1]), "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT
    ).stdout
    flags = [w.split("=")[0] for w in words[2:] if w.startswith("--")]
    assert help_text and all(flag in help_text for flag in flags), (flags, help_text)


@pytest.mark.parametrize(("page", "words", "cli", "args"), CLIS, ids=_id)
def test_cli_flags_exist(page: str, words: list[str], cli: list[str], args: list[str]) -> None:
    subcommand = [args[0]] if cli[-1] == "dogbreed.data" else []
    result = subprocess.run([*cli, *subcommand, "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    flags = [w.split("=")[0] for w in args if w.startswith("-")]
    assert all(flag in result.stdout for flag in flags), (flags, result.stdout)


@pytest.mark.parametrize("page", list(PAGES))
def test_python_snippets_compile_and_import(page: str) -> None:
    """Python blocks are valid code, and what they import from dogbreed exists."""
    for block in re.findall(r"```python\n(.*?)```", PAGES[page], re.S):
        compile(block, page, "exec")
        for line in block.splitlines():
            if line.startswith(("from dogbreed", "import dogbreed")):
                exec(line, {})


def test_readme_lists_the_commands_dogbreed_help_lists() -> None:
    block = README.split("## One command", 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    assert [line.split() for line in block.splitlines()] == [
        line.split() for line in usage().splitlines() if line.startswith("  ")
    ]


# a word that names a file or folder of this repository: under one of its top-level folders, or a top-level file
TOP = sorted(p.name for p in ROOT.iterdir() if not p.name.startswith(".") or p.name == ".ci")
PATH = re.compile(r"(?<![\w./-])((?:" + "|".join(map(re.escape, TOP)) + r")(?:/[\w.@+-]*)*)")


def named_paths(text: str) -> set[str]:
    """Repository paths named in code spans, code blocks and links; placeholders and globs left out."""
    spans = re.findall(r"`([^`\n]+)`", text) + re.findall(r"```\w*\n(.*?)```", text, re.S)
    spans += re.findall(r"\]\(([^)#\s]+)", text)
    found = set()
    for span in spans:
        for start in re.finditer(PATH, span):
            path = start.group(1).rstrip(".")
            tail = span[start.end() : start.end() + 1]
            if tail in ("*", "<", "{") or (path in TOP and not (ROOT / path).is_file()):
                continue  # a glob, a placeholder, or a top-level name used as a word (`dogbreed` the command)
            found.add(path)
    return found


@pytest.mark.parametrize("page", list(PAGES))
def test_named_paths_exist(page: str) -> None:
    """A path the pages name is in the repository, or one that runs write and git ignores (tests/artifacts/)."""
    missing = []
    for path in sorted(named_paths(PAGES[page])):
        if (ROOT / path).exists() or (page.startswith("docs/") and (ROOT / "docs" / path).exists()):
            continue
        ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0
        if not ignored:
            missing.append(path)
    assert not missing, f"{page} names paths that do not exist: {missing}"


def _slug(heading: str) -> str:
    """The anchor MkDocs' toc gives a heading."""
    text = re.sub(r"[^\w\s-]", "", heading.strip().lower())
    return re.sub(r"[-\s]+", "-", text).strip("-")


def test_readme_links_land_on_a_docs_heading() -> None:
    """The README is read on GitHub, outside the MkDocs build: its links into docs/ are checked here."""
    links = re.findall(r"\]\((docs/[^)#\s]+\.md)(?:#([\w-]+))?\)", README)
    assert len(links) >= 15
    for page, anchor in links:
        assert (ROOT / page).is_file(), page
        if anchor:
            headings = re.findall(r"^#+ (.+)$", (ROOT / page).read_text(), re.M)
            assert anchor in {_slug(h) for h in headings}, f"README links to {page}#{anchor}: no such heading"
