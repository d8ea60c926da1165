"""What every ``fedmeta`` sub-command shares: one way to fail, choices from the registries.

:func:`fail` prints ``error: <message>`` as one red line on stderr and returns the
``typer.Exit`` to raise (exit code 2 for a user error unless told otherwise).

An option whose values come from a registry (tasks and plug-ins, strategies, report
formats, backends, accountants) lists them in its help with :func:`choices_help`
and checks a value with :func:`choice`, a callback that fails in one line naming
the choices (and the closest one) instead of letting a typo reach the run.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from typing import Any

import typer
from rich.console import Console

__all__ = ["choice", "choices_help", "err_console", "fail", "one_of"]

err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def _keep_argument_help() -> None:
    """Typer sets an argument's ``help`` before calling click's ``Argument.__init__``,
    which since click 8.3 takes ``help`` itself and sets it back to None: every
    argument's help would vanish from ``--help``. Set it again after click's init."""
    from typer.core import TyperArgument

    init = TyperArgument.__init__
    if getattr(init, "_keeps_help", False):
        return

    def keep_help(self: TyperArgument, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        if getattr(self, "help", None) is None and kwargs.get("help"):
            self.help = kwargs["help"]

    keep_help._keeps_help = True  # type: ignore[attr-defined]
    TyperArgument.__init__ = keep_help  # type: ignore[method-assign]


_keep_argument_help()


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``error: <message>`` (one red line, stderr); return the Exit to raise."""
    err_console.print(f"error: {' '.join(message.split())}", style="bold red", markup=False)
    return typer.Exit(code)


def one_of(values: Sequence[str]) -> str:
    """``a | b | c``: how help texts and errors list choices."""
    return " | ".join(values)


def choices_help(text: str, values: Sequence[str]) -> str:
    """A help text ending in the choices: ``<text>: a | b | c``."""
    return f"{text}: {one_of(values)}" if text else one_of(values)


def choice(
    option: str,
    noun: str,
    values: Callable[[], Sequence[str]],
    *,
    also: Callable[[str], bool] | None = None,
    also_text: str = "",
) -> Callable[[str | None], str | None]:
    """A typer callback accepting ``values()`` (or what ``also`` accepts) and None;
    anything else fails in one line: ``option '--x': unknown <noun> 'v'; choose one of
    a | b (did you mean a?)``; ``also_text`` names what ``also`` accepts."""

    def check(value: str | None) -> str | None:
        if value is None:
            return value
        known = list(values())
        if value in known or (also is not None and also(value)):
            return value
        close = difflib.get_close_matches(value, known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        more = f" or {also_text}" if also_text else ""
        raise fail(
            f"option '{option}': unknown {noun} {value!r}; choose one of "
            f"{one_of(known)}{more}{hint}"
        )

    return check
