"""What fedmeta's commands print: fedmeta's own lines, Flower's only when asked.

fedmeta's modules log through their own ``logging.getLogger(__name__)``
loggers (under ``fedmeta``, ``server``, ``clients``, ``policies``).
``configure()`` gives those one handler on stderr, and sets Flower's logger:

* quiet (default): Flower shows errors only; fedmeta shows warnings;
* verbose: Flower's INFO lines (per-round progress of its engine), fedmeta's INFO.

Quiet also hides Opacus's "Secure RNG turned off" warning (simulated sites
draw their noise from a seeded generator on purpose, for reproducible runs;
the site's audit log records the noise source).

Every record is printed once: the configured loggers do not pass records on
to the root logger, to which Opacus adds a handler (``logging.basicConfig``)
when it is imported. Flower sets its logger's level when its logger module is
first imported, so that module is imported here before the level is set.
"""

from __future__ import annotations

import logging
import sys
import warnings

FEDMETA_LOGGERS = ("fedmeta", "server", "clients", "policies")
FLOWER_LOGGER = "flwr"
_configured = False


class _StderrHandler(logging.StreamHandler):
    """Writes to the current ``sys.stderr`` (so rich's live display can redirect it)."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {text}"
        return text


def configured() -> bool:
    """Whether a fedmeta command has chosen what is printed (``configure``)."""
    return _configured


def configure(verbose: bool = False) -> None:
    """Set up console logging for a fedmeta command (idempotent)."""
    import flwr.supercore.logger  # noqa: F401  (sets Flower's level at import: import first)

    global _configured
    _configured = True
    if not verbose:
        warnings.filterwarnings(
            "ignore", message="Secure RNG turned off", category=UserWarning, module="opacus"
        )

    flower = logging.getLogger(FLOWER_LOGGER)
    flower.setLevel(logging.INFO if verbose else logging.ERROR)
    flower.propagate = False  # Flower has its own console handler
    for name in FEDMETA_LOGGERS:
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
            logger.removeHandler(handler)
        handler = _StderrHandler()
        handler.setFormatter(_Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO if verbose else logging.WARNING)
        logger.propagate = False
