"""Every third-party package the code imports is declared in pyproject.toml."""

from __future__ import annotations

import ast
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
OURS = {"fedmeta", "server", "clients", "policies"}
# arrives with a declared requirement's extra: flwr[simulation] brings Ray
VIA_EXTRA = {"ray": "flwr"}


def imported_top_level() -> dict[str, str]:
    """Top-level module -> first file importing it, for the package code."""
    found: dict[str, str] = {}
    for pkg in sorted(OURS):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for name in names:
                    top = name.split(".")[0]
                    if top not in OURS and top not in sys.stdlib_module_names:
                        found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    return {canonicalize_name(Requirement(r).name) for r in reqs}


def test_every_imported_package_is_declared():
    dists = packages_distributions()
    names = declared()
    missing = []
    for module, where in imported_top_level().items():
        if module in VIA_EXTRA:
            assert VIA_EXTRA[module] in names
            continue
        owners = {canonicalize_name(d) for d in dists.get(module, [module])}
        if not owners & names:
            missing.append(f"{module} ({where}; distribution {', '.join(sorted(owners))})")
    assert missing == [], "imported but not declared in pyproject.toml: " + "; ".join(missing)


def test_the_scan_sees_the_imports_and_the_declarations():
    # the scan is not vacuous: the report renderer imports markupsafe, which is declared
    assert "markupsafe" in imported_top_level()
    assert canonicalize_name("markupsafe") in declared()
