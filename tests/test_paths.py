"""fedmeta.paths owns the layout: torch-free, and the one place every file name is written."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from fedmeta import paths
from fedmeta.paths import RunPaths, SitePaths

ROOT = Path(__file__).resolve().parents[1]


def test_importing_paths_loads_no_torch_flower_or_numpy():
    code = (
        "import sys, fedmeta.paths; "
        "bad = sorted({m.split('.')[0] for m in sys.modules} & "
        "{'torch', 'flwr', 'numpy', 'opacus', 'ray'}); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_run_and_site_paths(tmp_path):
    run = RunPaths(tmp_path)
    assert run.metrics == tmp_path / "metrics.jsonl"
    assert run.summary == tmp_path / "summary.json"
    assert run.config == tmp_path / "config.json"
    assert run.decisions == tmp_path / "policy-decisions.json"
    assert run.model == tmp_path / "final_model.pt"
    assert run.server_log == tmp_path / "audit" / "server-audit-log.jsonl"
    assert run.server_key == tmp_path / "keys" / "server-audit-signing.pem"
    assert run.server_pubkey == tmp_path / "keys" / "server-audit-signing.pub.pem"
    site = run.site("site-1")
    assert site == SitePaths(tmp_path / "sites" / "site-1")
    assert site.ledger == tmp_path / "sites" / "site-1" / "privacy-ledger.jsonl"
    assert site.audit_log == site.root / "audit" / "audit-log.jsonl"
    assert site.audit_key == site.root / "keys" / "audit-signing.pem"
    assert site.audit_pubkey == site.root / "keys" / "audit-signing.pub.pem"
    assert site.manifest == site.root / "manifest.toml"
    assert RunPaths(str(tmp_path)) == run  # a str is taken as a path; frozen, comparable
    assert paths.simulated_site_id(3) == "site-3"


def test_a_public_key_lies_beside_its_private_key():
    """fedmeta.audit.keys finds a public key as <stem>.pub.pem beside the private one."""
    from fedmeta.audit.keys import public_key_path

    assert public_key_path(paths.SERVER_AUDIT_KEY) == paths.SERVER_AUDIT_PUBKEY
    assert public_key_path(paths.SITE_AUDIT_KEY) == paths.SITE_AUDIT_PUBKEY


def test_env_names_are_fedmeta_prefixed_and_distinct():
    assert len(set(paths.ENV_NAMES)) == len(paths.ENV_NAMES)
    assert all(re.fullmatch(r"FEDMETA_[A-Z_]+", n) for n in paths.ENV_NAMES)
    assert {v for k, v in vars(paths).items() if k.endswith("_ENV")} == set(paths.ENV_NAMES)


def test_the_start_scripts_export_only_known_names():
    """The deployment templates export the variables fedmeta.paths names, no others."""
    from fedmeta.deploy import templates

    text = "\n".join(v for v in vars(templates).values() if isinstance(v, str))
    exported = set(re.findall(r"\b(FEDMETA_[A-Z_]+)=", text))
    assert exported and exported <= set(paths.ENV_NAMES), exported - set(paths.ENV_NAMES)


LAYOUT_LITERALS = {
    "metrics.jsonl",
    "summary.json",
    "config.json",
    "policy-decisions.json",
    "final_model.pt",
    "server-audit-log.jsonl",
    "audit-log.jsonl",
    "server-audit-signing.pem",
    "server-audit-signing.pub.pem",
    "audit-signing.pem",
    "audit-signing.pub.pem",
    "privacy-ledger.jsonl",
    "manifest.toml",
    "site.json",
    "approved-apps.jsonl",
    "approved-declarations.jsonl",
    "server-audit.pub.pem",
    "noise-secret",
    "supernode-auth.key",
    "supernode-auth.pub",
    "tls-client.key",
    "node-ids.txt",
}


def _code_strings(path: Path) -> list[tuple[int, str]]:
    """String constants of a module that are code, not docstrings or messages."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docs = {
        id(n.body[0].value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and n.body
        and isinstance(n.body[0], ast.Expr)
        and isinstance(n.body[0].value, ast.Constant)
    }
    in_fstring = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
    return [
        (n.lineno, n.value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant)
        and isinstance(n.value, str)
        and id(n) not in docs
        and id(n) not in in_fstring
    ]


def test_no_module_spells_a_layout_file_name_itself():
    """Outside fedmeta/paths.py, no code names a run- or site-directory file or a FEDMETA_*
    variable with a string literal of its own (messages and docstrings may mention them)."""
    found = []
    for package in ("fedmeta", "server", "clients"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == ROOT / "fedmeta" / "paths.py" or path.name == "templates.py":
                continue  # the deployment templates are shell text (checked above)
            for line, value in _code_strings(path):
                literal = value.strip()
                if (
                    literal in LAYOUT_LITERALS
                    or literal.endswith(tuple("/" + n for n in LAYOUT_LITERALS))
                    or re.fullmatch(r"FEDMETA_[A-Z_]+", literal)
                ):
                    found.append(f"{path.relative_to(ROOT)}:{line}: {value!r}")
    assert not found, "use fedmeta.paths instead:\n" + "\n".join(found)
