"""One real simulated run shared by every report test (built once per session, whichever
worker asks first; ~25 s)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for `import report_helpers`

from helpers import built_once_per_session  # noqa: E402
from report_helpers import build_run  # noqa: E402


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    def build(base: Path) -> None:
        res = build_run(base / "run", base)
        assert res.returncode == 0, res.stderr[-3000:]

    return built_once_per_session(tmp_path_factory, "report-run", build) / "run"
