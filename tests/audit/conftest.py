"""Fixtures for the audit-log tests: real files under tmp_path, real keys."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for `import audit_helpers`

from audit_helpers import LogFixture, fill_log  # noqa: E402

from fedmeta.audit import AuditLog  # noqa: E402


@pytest.fixture
def make_log(tmp_path: Path) -> Callable[..., LogFixture]:
    """Build a log of `n` entries after log.created (so n + 1 lines)."""

    def _make(n: int = 5, name: str = "site-1") -> LogFixture:
        fx = LogFixture(
            tmp_path / "audit" / f"{name}.jsonl", tmp_path / "keys" / f"{name}.pem", name
        )
        with AuditLog.open(fx.path, fx.key_path, name) as log:
            fx.receipts = fill_log(log, n)
        return fx

    return _make
