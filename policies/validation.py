"""Validation shared by every file fedmeta reads: one error line, one site id, one country.

Every pydantic model of the project (run and site declarations, the DPIA, the run
config, the federation file, site requests, report inputs) reports a bad value the
same way, through :func:`format_validation_error`::

    site.toml: field 'lawful_basis': must be one of a, b, c, d, e, f (got 'g')
    fed.toml: field 'sites[1].country': must be an ISO 3166 alpha-2 country code ...
    config.json: option 'rounds': must be greater than or equal to 1 (got 0)

that is ``<file>: <noun> '<field path>': <what is wrong and what to do>``, with
``(and N more problem(s))`` when there are more. Messages never span lines.

:data:`SiteId` and :data:`Country` are the one definition of a pseudonymous site
id and of an ISO 3166-1 alpha-2 country code; every model and check uses them
(or :func:`check_site_id` / :func:`check_country` outside pydantic).

This module is plain Python plus pydantic, like the rest of ``policies``, so any
part of fedmeta may import it.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ValidationError

from policies.countries import iso_countries

__all__ = [
    "SITE_ID_PATTERN",
    "Country",
    "SiteId",
    "check_country",
    "check_site_id",
    "describe_error",
    "field_path",
    "one_line",
    "format_validation_error",
]

SITE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""A pseudonymous site id: at most 64 letters, digits, '.', '_' or '-', not starting
with a punctuation mark (it names directories and appears in logs and reports)."""


def one_line(text: object, limit: int = 500) -> str:
    """``text`` with every run of whitespace (line breaks included) made one space,
    cut to ``limit`` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def check_site_id(value: str) -> str:
    """``value`` if it is a pseudonymous site id, else ValueError saying what one is."""
    if not isinstance(value, str) or not SITE_ID_PATTERN.fullmatch(value):
        raise ValueError(
            "must be a pseudonymous id of at most 64 letters, digits, '.', '_' or '-' "
            f"such as site-de-01 (got {one_line(repr(value), 80)})"
        )
    return value


def check_country(value: str) -> str:
    """The upper-case ISO 3166-1 alpha-2 code for ``value`` (surrounding spaces and case
    are forgiven), else ValueError saying what to write."""
    if not isinstance(value, str):
        raise ValueError(
            f"must be an ISO 3166 alpha-2 country code such as DE or IN "
            f"(got {one_line(repr(value), 80)})"
        )
    code = value.strip().upper()
    if code == "UK":
        raise ValueError("'UK' is not an ISO 3166 code: use GB for the United Kingdom")
    if code == "EL":
        raise ValueError("'EL' is the EU's code: use the ISO 3166 code GR for Greece")
    if code not in iso_countries():
        raise ValueError(
            "must be an ISO 3166 alpha-2 country code such as DE or IN "
            f"(got {one_line(repr(value), 80)})"
        )
    return code


SiteId = Annotated[str, AfterValidator(check_site_id)]
"""A pseudonymous site id (:data:`SITE_ID_PATTERN`)."""

Country = Annotated[str, AfterValidator(check_country)]
"""An ISO 3166-1 alpha-2 country code, stored upper-case."""


def field_path(loc: tuple[int | str, ...] | list[int | str]) -> str:
    """pydantic's error location as a path: ``sites[1].country``.

    The validator names pydantic inserts for annotated and union types
    (``function-after[...]``, ``list[str]``) are dropped."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not ("[" in part and "]" in part):
            path += ("." if path else "") + part
    return path


def describe_error(
    error: Mapping[str, Any], model: type[BaseModel] | None = None, noun: str = "field"
) -> tuple[str, str]:
    """(field path, what is wrong and what to do) for one of ``ValidationError.errors()``.

    ``model`` (the model validated at the top) lets an unknown top-level field
    suggest the closest known one."""
    kind = str(error.get("type", ""))
    loc = field_path(tuple(error.get("loc", ())))
    msg = str(error.get("msg", ""))
    got = one_line(repr(error.get("input")), 60)
    if kind == "missing":
        return loc, "is required: add it"
    if kind == "extra_forbidden":
        parts = tuple(error.get("loc", ()))
        hint = ""
        if model is not None and len(parts) == 1:
            names = [f.alias or name for name, f in model.model_fields.items()]
            close = difflib.get_close_matches(str(parts[0]), names, n=1)
            known = f"did you mean '{close[0]}'?" if close else "known: " + ", ".join(names)
            hint = f" ({known})"
        return loc, f"is not a known {noun}: remove it or fix its spelling{hint}"
    if kind in {"literal_error", "enum"}:
        expected = str(error.get("ctx", {}).get("expected", ""))
        expected = expected.replace("'", "").replace(" or ", ", ")
        return loc, f"must be one of {expected} (got {got})"
    if kind in {"model_type", "model_attributes_type", "dict_type"}:
        return loc, f"must be a table (got {got})"
    if kind in {"list_type", "tuple_type", "set_type", "frozen_set_type", "iterable_type"}:
        return loc, f"must be a list (got {got})"
    if kind in {"value_error", "assertion_error"}:
        msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if not loc:
            m = re.match(r"^([A-Za-z_][\w.\[\]-]*): (.*)$", msg)
            if m:
                return m.group(1), m.group(2)
        return loc, msg
    msg = re.sub(r"^(Input|String|Value|List|Tuple|Set|Frozenset|Dictionary) should ", "must ", msg)
    return loc, f"{msg} (got {got})"


def format_validation_error(
    exc: ValidationError,
    source: str,
    *,
    model: type[BaseModel] | None = None,
    noun: str = "field",
    whole: str | None = None,
    limit: int = 500,
) -> str:
    """One line for a pydantic error: ``<source>: <noun> '<path>': <what to do>``.

    ``source`` names the file (or what was read); ``noun`` is what a path is called
    there ("field", "option"); ``whole`` replaces ``<noun> '<path>'`` for an error
    about the whole document (default: ``source`` alone). The first problem is
    described, the count of the others appended."""
    errors = exc.errors(include_url=False)
    path, what = describe_error(errors[0], model, noun) if errors else ("", "is not valid")
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    where = f"{noun} '{path}': " if path else (f"{whole}: " if whole else "")
    prefix = f"{source}: " if source else ""
    return one_line(f"{prefix}{where}{what}{more}", limit)
