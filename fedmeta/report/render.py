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
import re
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
import markupsafe

from fedmeta.report.model import Report
from fedmeta.report.summary import group_checks, group_decisions, site_records_view

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


def _css(value: Any) -> markupsafe.Markup:
    """Text safe inside a CSS string in a <style> element (page footers)."""
    return markupsafe.Markup(re.sub(r"[^A-Za-z0-9._:+ -]", "", str(value))[:80])


def _ranges(values: Any) -> str:
    """Round numbers as ranges: 1-5, 7, 9-10."""
    nums = sorted({int(v) for v in values or []})
    if not nums:
        return "-"
    out, start, prev = [], nums[0], nums[0]
    for n in [*nums[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ", ".join(out)


def _sites(values: Any, every: Any = None) -> str:
    """Sites of a grouped row: "all N sites" when they are every site of the report, all
    of them when few, else the count and the list."""
    values = list(values or [])
    if every is not None and len(values) > 1 and sorted(values) == sorted(every):
        return f"all {len(values)} sites"
    if len(values) <= 3:
        return ", ".join(values) or "-"
    return f"{len(values)} sites: " + ", ".join(values)


@cache
def _env(autoescape: bool) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=autoescape,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(
        num=_num,
        md=_md,
        short=_short,
        join_list=_join,
        css=_css,
        ranges=_ranges,
        sites=_sites,
        group_decisions=group_decisions,
        site_records_view=site_records_view,
        group_checks=group_checks,
    )
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
