"""The repository stands alone: no file cites a document that is not in it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve()
SKIP_DIRS = {
    ".git",
    ".venv",
    "node_modules",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    "build",
    "dist",
    "runs",
}
TEXT_SUFFIXES = {
    ".py",
    ".md",
    ".toml",
    ".txt",
    ".cfg",
    ".ini",
    ".sh",
    ".html",
    ".j2",
    ".yml",
    ".yaml",
    ".json",
    "",
}

# documents that were never part of the repository (working notes kept beside it)
ABSENT = re.compile(
    r"DESIGN\.md|COMPLIANCE-NOTES|[A-Z]+-NOTES\b|COMPLIANCE [A-Z]\d\d|\.\./shared\b|/work(?=/)"
)
DOCS_LINK = re.compile(r"\bdocs/[\w./-]+\.md\b")


def repo_files() -> list[Path]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60
        ).stdout.decode()
        files = [ROOT / name for name in out.split("\0") if name]
    except (OSError, subprocess.SubprocessError):  # not a git checkout (an sdist)
        files = [
            p
            for p in ROOT.rglob("*")
            if p.is_file() and not SKIP_DIRS.intersection(p.relative_to(ROOT).parts)
        ]
    return [p for p in files if p.suffix in TEXT_SUFFIXES and p.is_file() and p != HERE]


def texts() -> list[tuple[Path, str]]:
    found = []
    for path in repo_files():
        try:
            found.append((path, path.read_text(encoding="utf-8")))
        except UnicodeDecodeError:
            continue
    return found


def test_no_file_cites_a_document_outside_the_repository():
    cited = [
        f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
        for path, text in texts()
        for m in ABSENT.finditer(text)
    ]
    assert not cited, "documents absent from the repository are cited:\n" + "\n".join(cited)


def test_every_cited_docs_page_exists():
    missing = sorted(
        {
            f"{path.relative_to(ROOT)}: {m.group(0)}"
            for path, text in texts()
            for m in DOCS_LINK.finditer(text)
            if not (ROOT / m.group(0)).is_file()
        }
    )
    assert not missing, "cited docs pages that do not exist:\n" + "\n".join(missing)


def test_the_check_finds_what_it_looks_for():
    """The patterns match the references they are meant to catch (else the tests above
    could not fail). The examples are assembled from pieces so that this file itself
    holds none of them (a plain grep of the repository stays clean)."""
    md = ".md"
    for cited in (
        "see DESIGN" + md + " §4",
        "COMPLIANCE-NOTES" + md,
        "per OPACUS-NOTES",
        "FLOWER-NOTES" + md,
        "COMPLIANCE M03",
        "(COMPLIANCE G20)",
        "../" + "shared/x" + md,
        "/" + "work/main/fedmeta",
    ):
        assert ABSENT.search(cited), cited
    for fine in (
        "docs/compliance.md",
        "GDPR Art. 9(2)",
        "the design of fedmeta",
        "FIELD_NOTES = {",
        "shared session-scoped runs",
    ):
        assert not ABSENT.search(fine), fine
    assert DOCS_LINK.search("see docs/no-such-page.md") and len(repo_files()) > 50
