"""``fedmeta config``: every run-configuration key with its default, range and meaning.

Generated from :class:`fedmeta.config.RunConfig` itself, so the listing can
never drift from what the validator accepts.
"""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass
from typing import Any

import typer
from annotated_types import Ge, Gt, Le, Lt, MaxLen, MinLen
from pydantic.fields import FieldInfo
from rich.console import Console
from rich.table import Table

from fedmeta.config import RunConfig


@dataclass(frozen=True)
class KeyHelp:
    """One configuration key as ``fedmeta config`` shows it."""

    key: str
    default: Any
    allowed: str
    meaning: str


def _range(info: FieldInfo) -> str:
    lo = hi = ""
    parts: list[str] = []
    for m in info.metadata:
        if isinstance(m, Ge):
            lo = f">= {m.ge}"
        elif isinstance(m, Gt):
            lo = f"> {m.gt}"
        elif isinstance(m, Le):
            hi = f"<= {m.le}"
        elif isinstance(m, Lt):
            hi = f"< {m.lt}"
        elif isinstance(m, MinLen):
            parts.append(f"at least {m.min_length} characters")
        elif isinstance(m, MaxLen):
            parts.append(f"at most {m.max_length} characters")
    parts = [p for p in (lo, hi) if p] + parts
    return ", ".join(parts)


def _allowed(info: FieldInfo) -> str:
    ann = info.annotation
    if typing.get_origin(ann) is typing.Literal:
        return " | ".join(str(a) for a in typing.get_args(ann))
    kind = {bool: "true | false", int: "integer", float: "number", str: "text"}.get(ann, str(ann))  # type: ignore[call-overload]
    rng = _range(info)
    return f"{kind} {rng}".strip() if rng else kind


def config_keys() -> list[KeyHelp]:
    """Every key of :class:`RunConfig`, in declaration order, dash-spelled."""
    out = []
    for name, info in RunConfig.model_fields.items():
        default = info.get_default(call_default_factory=True)
        out.append(
            KeyHelp(
                key=info.alias or name,
                default=default,
                allowed=_allowed(info),
                meaning=info.description or "",
            )
        )
    return out


def as_toml(keys: list[KeyHelp]) -> str:
    """The defaults as a commented TOML file (usable with ``fedmeta simulate --config``)."""
    lines = ["# fedmeta run configuration: every key with its default (fedmeta config --toml)"]
    for k in keys:
        lines.append(f"# {k.meaning} [{k.allowed}]" if k.meaning else f"# [{k.allowed}]")
        lines.append(f"{k.key} = {json.dumps(k.default)}")
    return "\n".join(lines) + "\n"


def config_command(
    toml: bool = typer.Option(
        False, "--toml", help="print the defaults as a TOML file for `fedmeta simulate --config`"
    ),
) -> None:
    """List every run-configuration key with its default, allowed values and meaning."""
    keys = config_keys()
    if toml:
        typer.echo(as_toml(keys), nl=False)
        return
    table = Table(title="run configuration (fedmeta simulate --set KEY=VALUE, --config FILE)")
    for col in ("key", "default", "allowed", "meaning"):
        table.add_column(col, overflow="fold")
    for k in keys:
        table.add_row(k.key, json.dumps(k.default), k.allowed, k.meaning)
    Console().print(table)
