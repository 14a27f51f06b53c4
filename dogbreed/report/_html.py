"""What both reports are made of (training and tuning): one style, tables, embedded images, the page.

Kept in one place so the two reports look alike and stay self-contained (images as data URIs, no links).
"""

from __future__ import annotations

import csv
import html
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1150px;color:#222;
padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
td,th{border:1px solid #ddd;padding:.3em .6em;vertical-align:top}
th{background:#f4f4f4;text-align:left}img{max-width:100%}.muted{color:#777}
.IssuesFound{background:#fde2e1;font-weight:bold}.NoIssuesFound{background:#e3f6e5}.Error{background:#fff1c9;font-weight:bold}
.NotApplicable{background:#eee;color:#666}.box{background:#f8f8f8;border-left:4px solid #888;padding:.6em 1em}
tr.best{background:#e3f6e5;font-weight:bold}tr.pruned{color:#888;font-style:italic}tr.failed{background:#fff1c9}
pre{background:#f8f8f8;padding:.6em 1em;white-space:pre-wrap;word-break:break-all}
"""


def table(
    headers: list[str], rows: list[list[Any]], raw: set[int] | None = None, row_classes: Sequence[str] = ()
) -> str:
    """An HTML table; cells are escaped unless their column is in ``raw``, rows may carry a CSS class.

    All-empty ``headers`` (a key/value table) give no header row rather than an empty grey one.
    """
    raw = raw or set()
    head = f"<tr>{''.join(f'<th>{html.escape(h)}</th>' for h in headers)}</tr>" if any(headers) else ""
    body = ""
    for n, row in enumerate(rows):
        css = row_classes[n] if n < len(row_classes) else ""
        cells = "".join(f"<td>{c if i in raw else html.escape(str(c))}</td>" for i, c in enumerate(row))
        body += f'<tr class="{css}">{cells}</tr>' if css else f"<tr>{cells}</tr>"
    return f"<table>{head}{body}</table>"


def img(b64: str | None, alt: str) -> str:
    """A base64 PNG as an inline image (the report stays one file), or a note that there is no data."""
    if not b64:
        return f'<p class="muted">No data for {html.escape(alt)}.</p>'
    return f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}"></p>'


def seconds(value: float | None) -> str:
    """A duration for people: seconds, or minutes past two of them; ``-`` when unknown."""
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value / 60:.1f} min" if value >= 120 else f"{value:.1f} s"


def read_csv(path: Path) -> list[dict[str, str]]:
    """A CSV file's rows as dicts; none for a missing file (a run may not have written it)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def page(title: str, heading: str, run_dir: Path, sections: Sequence[str]) -> str:
    """The whole HTML document: the shared style, a heading with the run dir and the time, then the sections."""
    header = (
        f"<h1>{html.escape(heading)}</h1><p class='muted'>{html.escape(str(run_dir.resolve()))}<br>generated "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}</p>"
    )
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body>{header}{''.join(sections)}</body></html>"
    )
