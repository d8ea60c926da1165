"""One real simulated run shared by every report test (built once per session, ~25 s)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for `import report_helpers`

from report_helpers import build_run  # noqa: E402


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("report")
    out = base / "run"
    res = build_run(out, base)
    assert res.returncode == 0, res.stderr[-3000:]
    return out
