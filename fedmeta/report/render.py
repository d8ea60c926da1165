"""Render a :class:`Report` as JSON, Markdown or one self-contained HTML file.

* JSON: the model's canonical serialisation, validated against ``schema.json``.
* HTML: ``templates/report.html.j2`` with inline CSS and the plots embedded as
  base64 PNG; no external asset, prints on A4 (``@media print``).
* Markdown: ``templates/report.md.j2``; the plots are written as PNG files
  beside the ``.md`` file and linked.
"""

from __future__ import annotations

import json
import math
from functools import cache
from pathlib import Path
from typing import Any

import jinja2

from fedmeta.report.model import Report

HERE = Path(__file__).parent
SCHEMA_FILE = HERE / "schema.json"
FORMATS = ("html", "json", "md")


@cache
def schema() -> dict[str, Any]:
    return json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))


def validate(doc: dict[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` if ``doc`` does not follow ``schema.json``."""
    import jsonschema

    jsonschema.Draft202012Validator(schema()).validate(doc)


def to_json(report: Report) -> str:
    text = report.model_dump_json(indent=2)
    validate(json.loads(text))
    return text + "\n"


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isinf(value):
            return "no limit"
        return f"{value:.{digits}g}"
    return str(value)


def _md(value: Any) -> str:
    """A Markdown table cell: no pipes or newlines break the table."""
    return " ".join(str(value).split()).replace("|", "\\|")


def _short(value: str | None, n: int = 16) -> str:
    if not value:
        return "-"
    if ":" in value:  # a receipt SEQ:HASH
        seq, h = value.split(":", 1)
        return f"{seq}:{h[:n]}…"
    return value[:n] + "…"


def _join(values: Any, sep: str = ", ") -> str:
    values = list(values or [])
    return sep.join(str(v) for v in values) if values else "-"


@cache
def _env(autoescape: bool) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=autoescape,
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
        keep_trailing_newline=True)
    env.filters.update(num=_num, md=_md, short=_short, join_list=_join)
    return env


def to_html(report: Report, images: dict[str, str]) -> str:
    """``images``: plot name -> ``data:`` URI."""
    return _env(True).get_template("report.html.j2").render(r=report, images=images)


def to_markdown(report: Report, images: dict[str, str]) -> str:
    """``images``: plot name -> relative path of the PNG file."""
    return _env(False).get_template("report.md.j2").render(r=report, images=images)


def render(report: Report, fmt: str, out: Path) -> Path:
    """Write the report to ``out`` in ``fmt`` (html, json or md); returns ``out``."""
    from fedmeta.report.plots import data_uri, plots

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "json":
        out.write_text(to_json(report), encoding="utf-8")
    elif fmt == "html":
        uris = {name: data_uri(png) for name, png in plots(report).items()}
        out.write_text(to_html(report, uris), encoding="utf-8")
    elif fmt == "md":
        files = {}
        for name, png in plots(report).items():
            path = out.with_name(f"{out.stem}-{name}.png")
            path.write_bytes(png)
            files[name] = path.name
        out.write_text(to_markdown(report, files), encoding="utf-8")
    else:
        raise ValueError(f"unknown report format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return out
