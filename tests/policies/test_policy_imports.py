"""The policy package stays plain Python: no torch, no Flower, nothing of fedmeta."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_policies_import_no_ml_and_nothing_of_the_project():
    code = (
        "import policies, sys; "
        "assert not any(m.split('.')[0] in {'torch','flwr','fedmeta'} for m in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_policies_import_nothing_heavy_or_sibling():
    code = (
        "import policies, policies.gdpr, policies.dpdp, policies.privacy, sys; "
        "bad = sorted({m.split('.')[0] for m in sys.modules} & "
        "{'torch','flwr','fedmeta','server','clients','numpy','opacus','ray'}); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_source_imports_are_stdlib_pydantic_or_policies():
    allowed = set(sys.stdlib_module_names) | {"pydantic", "policies"}
    for path in (ROOT / "policies").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"
