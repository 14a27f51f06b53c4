"""MkDocs hook: the pages that must not drift from the code are written from it at every build.

``<!-- generated: config-reference -->`` becomes the reference of ``conf/`` (every group, option, key, default and
the YAML comment above or beside it) and ``<!-- generated: rules-table -->`` the table of the rule classes of
``dogbreed.rules`` with their default thresholds.
Hooked in by ``mkdocs.yml``; ``tests/test_docs.py`` imports these functions too.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
PRIMARY = ("train", "tune", "launch_sagemaker")  # the configs a command composes; every other file is a group option
# a YAML key at the start of a line, then its value and an optional trailing comment
_KEY = re.compile(r"^(?P<indent>\s*)(?P<key>[\w./@-]+):(?:\s+(?P<rest>.*))?$")


@dataclass
class Entry:
    """One key of a YAML file: its dotted name as users type it, the value as written, and its comment."""

    key: str
    value: str
    comment: str


def _split_comment(text: str) -> tuple[str, str]:
    """``value  # comment`` -> (value, comment), leaving a ``#`` inside quotes alone."""
    quote = ""
    for i, char in enumerate(text):
        if char in "'\"" and not quote:
            quote = char
        elif char == quote:
            quote = ""
        elif char == "#" and not quote and (i == 0 or text[i - 1].isspace()):
            return text[:i].strip(), text[i + 1 :].strip()
    return text.strip(), ""


def _open(value: str) -> bool:
    return value.count("[") > value.count("]") or value.count("{") > value.count("}")


def read_yaml(path: Path, package: str) -> tuple[list[str], list[Entry]]:
    """The file's header comment and its entries, keys prefixed by the Hydra ``package`` they land in."""
    lines = path.read_text().splitlines()
    header: list[str] = []
    while lines and lines[0].startswith("#"):
        text = lines.pop(0).lstrip("#").strip()
        if text.startswith("@package"):
            package = "" if text.split()[1] == "_global_" else text.split()[1]
        else:
            header.append(text)
    entries: list[Entry] = []
    stack: list[tuple[int, str]] = []  # (indent, key) of the mappings the current line is inside
    pending: list[str] = []  # comment lines waiting for the key they describe
    for line in lines:
        stripped = line.strip()
        if not stripped:
            pending = []
        elif stripped.startswith("#"):
            pending.append(stripped.lstrip("#").strip())
        elif stripped.startswith("- ") and entries:  # an item of a block list: part of the last key's value
            item, comment = _split_comment(stripped[2:])
            last = entries[-1]
            last.value = f"{last.value}, {item}" if last.value else item
            last.comment = " ".join(filter(None, [last.comment, *pending, comment]))
            pending = []
        elif match := _KEY.match(line):
            indent = len(match["indent"])
            while stack and stack[-1][0] >= indent:
                stack.pop()
            value, comment = _split_comment(match["rest"] or "")
            key = ".".join(filter(None, [package, *(k for _, k in stack), match["key"]]))
            entries.append(Entry(key, value, " ".join([*pending, comment]).strip()))
            stack.append((indent, match["key"]))
            pending = []
        elif entries and _open(entries[-1].value):  # a flow list or mapping continued on the next line
            item, comment = _split_comment(stripped)
            entries[-1].value = f"{entries[-1].value} {item}"
            entries[-1].comment = " ".join(filter(None, [entries[-1].comment, comment]))
        else:
            raise ValueError(f"{path}: cannot read line {line!r} for the configuration reference; one key a line")
    for entry in entries:  # `key:` with nothing under it is YAML's null
        if entry.value == "" and not any(e.key.startswith(f"{entry.key}.") for e in entries):
            entry.value = "null"
    return header, entries


def _cell(text: str) -> str:
    """Text for a table cell, shown as written: no table breaks, HTML tags or emphasis."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace("*", "\\*")


def _header(lines: list[str]) -> list[str]:
    """A file's header comment, kept as the YAML comment it is (its lines are often commands)."""
    return ["```yaml", *(f"# {line}".rstrip() for line in lines), "```"] if lines else []


def _table(entries: list[Entry]) -> str:
    rows = ["| key | default | comment |", "| --- | --- | --- |"]
    for entry in entries:
        value = "`" + entry.value.replace("|", "\\|") + "`" if entry.value else ""
        rows.append(f"| `{_cell(entry.key)}` | {value} | {_cell(entry.comment)} |")
    return "\n".join(rows)


def _defaults(name: str, conf: Path = CONF) -> dict[str, str]:
    """``{group: option}`` of a config's own defaults list (``null``: no option unless one is chosen)."""
    chosen: dict[str, str] = {}
    for item in OmegaConf.to_container(OmegaConf.load(conf / f"{name}.yaml")).get("defaults", []):
        if isinstance(item, dict):
            chosen.update({str(k): "null" if v is None else str(v) for k, v in item.items()})
    return chosen


def groups(conf: Path = CONF) -> dict[str, list[Path]]:
    """Every config group (``model/optimizer`` for nested ones) and its option files."""
    found: dict[str, list[Path]] = {}
    for path in sorted(conf.rglob("*.yaml")):
        if path.parent != conf:
            found.setdefault(path.parent.relative_to(conf).as_posix(), []).append(path)
    return found


def config_reference(conf: Path = CONF) -> str:
    """The configuration reference page's body, from the files of ``conf`` alone."""
    out = [
        "Written from `conf/` at every build of these pages (`docs/hooks/generate.py`), so it lists what the code "
        "reads: each key as you type it on the command line, its default and the comment it has in the YAML file.",
        "",
        "## Commands' configs",
    ]
    for name in PRIMARY:
        header, entries = read_yaml(conf / f"{name}.yaml", package="")
        out += ["", f"### `{name}.yaml`", "", *_header(header), "", _table(entries)]
    chosen = {name: _defaults(name, conf) for name in PRIMARY}
    # an option may choose the default of a group nested under its own (model=resnet18 picks model/optimizer)
    nested: dict[str, list[str]] = {}
    for group, files in groups(conf).items():
        for path in files:
            for key, option in _defaults(path.relative_to(conf).with_suffix("").as_posix(), conf).items():
                if not key.startswith(("/", "override")):
                    nested.setdefault(f"{group}/{key}", []).append(f"`{option}` with `{group}={path.stem}`")
    out += ["", "## Groups", "", "Choose an option with `GROUP=OPTION` (`data=demo`, `model/optimizer=sgd`)."]
    for group, files in groups(conf).items():
        options = ", ".join(f"`{p.stem}`" for p in files)
        default = "; ".join(
            [f"`{chosen[n][group]}` in `{n}.yaml`" for n in PRIMARY if group in chosen[n]] + nested.get(group, [])
        )
        out += ["", f"### `{group}`", "", f"Options: {options}. Default: {default or 'none (`null`)'}."]
        for path in files:
            header, entries = read_yaml(path, package=group.replace("/", "."))
            out += ["", f"#### `{group}={path.stem}`", "", f"`conf/{group}/{path.name}`", "", *_header(header)]
            if entries:
                out += ["", _table(entries)]
    return "\n".join(out) + "\n"


def _summary(cls: type) -> str:
    """The first paragraph of a class's docstring, on one line."""
    return " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())


def rules_table() -> str:
    """Every debugger and profiler rule: its name as configured, what makes it fire, its default thresholds."""
    from dogbreed.rules import PROFILER_RULES, RULES

    def params(parameters: dict[str, Any]) -> str:
        shown = {k: json.dumps(v) if isinstance(v, bool) or v is None else v for k, v in parameters.items()}
        return ", ".join(f"`{k}={v}`" for k, v in shown.items() if k != "stop_training_on_fire")

    rows = ["| rule | set under | fires when | defaults |", "| --- | --- | --- | --- |"]
    for registry, option in ((RULES, "callbacks.debugger.rules"), (PROFILER_RULES, "callbacks.profiler.rules")):
        for name, cls in registry.items():
            rows.append(f"| `{name}` | `{option}` | {_cell(_summary(cls))} | {_cell(params(cls().parameters()))} |")
    return "\n".join(rows) + "\n"


GENERATED = {"config-reference": config_reference, "rules-table": rules_table}


def on_page_markdown(markdown: str, **_: Any) -> str:
    """Replace each ``<!-- generated: NAME -->`` marker with what ``GENERATED[NAME]`` writes now."""
    return re.sub(r"<!-- generated: ([\w-]+) -->", lambda m: GENERATED[m[1]](), markdown)
