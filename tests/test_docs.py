"""The documentation site builds with every warning an error, and its generated pages say what the code says.

``tests/test_readme.py`` checks the pages' commands and paths; this file builds them (``mkdocs build --strict``,
as a contributor would) and checks the two pages written from the code at build time against the code, read
independently: the configuration reference against OmegaConf's reading of ``conf/``, the rules table against
the rule classes.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
MKDOCS = [sys.executable, "-m", "mkdocs", "build", "--strict"]
ENV = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's banner about its successor is not a build problem


def _hook() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_generate", ROOT / "docs" / "hooks" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


generate = _hook()


def _build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MKDOCS, "-f", str(config), "--site-dir", str(site)], capture_output=True, text=True, timeout=300, env=ENV,
        cwd=config.parent,
    )  # fmt: skip


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site as CI builds it."""
    out = tmp_path_factory.mktemp("site")
    result = _build(ROOT / "mkdocs.yml", out)
    assert result.returncode == 0, result.stderr[-5000:]
    assert "WARNING" not in result.stderr, result.stderr[-5000:]
    return out


def test_site_builds_strict_with_every_page(site: Path) -> None:
    pages = {p.stem for p in (ROOT / "docs").glob("*.md")} - {"index"}
    assert {p for p in pages if not (site / p / "index.html").is_file()} == set()
    nav = (site / "index.html").read_text()
    assert all(f'href="{p}/"' in nav for p in pages), "a page is missing from the navigation (mkdocs.yml nav)"


def test_strict_build_fails_on_a_broken_link(tmp_path: Path) -> None:
    """The build the test above runs is strict indeed: a link to a missing heading stops it."""
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copytree(ROOT / "conf", tmp_path / "conf")  # the hook writes the reference from the checkout's conf/
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    page = tmp_path / "docs" / "data.md"
    page.write_text(page.read_text() + "\nSee [the rules](debugging.md#no-such-heading).\n")
    result = _build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0 and "no-such-heading" in result.stderr, result.stderr[-3000:]


def _option_files() -> list[tuple[Path, str]]:
    files = [(ROOT / "conf" / f"{name}.yaml", "") for name in generate.PRIMARY]
    for group, paths in generate.groups().items():
        files += [(path, group.replace("/", ".")) for path in paths]
    return files


@pytest.mark.parametrize(("path", "package"), _option_files(), ids=lambda v: str(v).rpartition("conf/")[2])
def test_config_reference_has_every_key_its_default_and_comment(path: Path, package: str) -> None:
    text = path.read_text()
    if text.startswith("# @package _global_"):
        package = ""
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}  # a file of comments only: {}
    raw.pop("defaults", None)
    _, entries = generate.read_yaml(path, package)
    got = {e.key: e.value for e in entries}

    def same(node: Any, key: str) -> None:
        """The reference's value of ``key`` is what OmegaConf read, or its keys are listed one by one."""
        if got.get(key):  # a scalar, or a list or mapping written on one line
            assert yaml.safe_load(got[key]) == node, (path, key, got[key], node)
        else:
            assert isinstance(node, dict) and key in {*got, package}, f"{path}: {key} is missing from the reference"
            for child, value in node.items():
                same(value, f"{key}.{child}" if key else str(child))

    same(raw, package)
    # every comment of the file below its header reaches the page
    comments = " ".join(e.comment for e in entries)
    header_done = False
    for line in text.splitlines():
        if not line.startswith("#"):
            header_done = True
        if header_done and "#" in line and not line.strip().startswith("- _self_"):
            comment = re.split(r"(?:^|\s)#\s?", line.strip(), maxsplit=1)[-1].strip()
            assert comment in comments, f"{path}: the comment {comment!r} is not in the reference"


def test_config_reference_page_names_every_group_and_option(site: Path) -> None:
    page = (site / "configuration-reference" / "index.html").read_text()
    for group, paths in generate.groups().items():
        assert f"<code>{group}</code>" in page
        for path in paths:
            assert f"<code>{group}={path.stem}</code>" in page, f"{group}={path.stem}"
    assert "<code>model.weights</code>" in page and "torchvision weights name" in page


def test_rules_table_has_every_rule_and_default(site: Path) -> None:
    from dogbreed.rules import PROFILER_RULES, RULES

    page = (site / "debugging" / "index.html").read_text()
    for name, cls in {**RULES, **PROFILER_RULES}.items():
        row = re.search(rf"<tr>\s*<td><code>{name}</code></td>.*?</tr>", page, re.S)
        assert row, f"rule {name} is missing from the rules table"
        for key, value in cls().parameters().items():
            if key != "stop_training_on_fire":
                shown = "null" if value is None else str(value).lower() if isinstance(value, bool) else value
                assert f"<code>{key}={shown}</code>" in row.group(0), (name, key)
