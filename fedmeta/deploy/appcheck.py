"""A site runs only code it approved: the app (FAB) check of every ClientApp process.

Flower sends each run's app to the SuperNodes as a FAB (a zip) and the ClientApp
process installs it under ``$FLWR_HOME/apps/`` and imports it. A site's node
(``fedmeta node supernode``) starts every ClientApp process itself, through
:mod:`fedmeta.deploy.lifeline`; there :func:`install_in_clientapp` puts
:func:`check_fab` in front of Flower's ``install_from_fab``, which is the first thing
the process does with the app. The check reads the FAB's bytes in memory (nothing is
written or imported) and passes it only if the site approved:

* its exact SHA-256 (``fedmeta node approve-app SITE_DIR --fab-hash HEX`` or
  ``--fab FILE``), the hash Flower's ``flwr build`` names the file after; or
* its *release digest* (``--release [DIR]``; ``fedmeta node init`` approves the
  release installed at the site): a SHA-256 over every file of the FAB that can run
  at a site, which is every Python file outside ``server/`` (the ServerApp package,
  which runs only at the coordinator and which no site-side module imports), every
  file of the site-side packages (``clients/``, ``fedmeta/``, ``policies/``, their
  data included) and the ClientApp reference in its ``pyproject.toml``. Run settings
  (``[tool.flwr.app.config]``, ``run.toml``) and documents do not change it.

An app that passes neither is refused before it is installed: the refusal goes to the
site's signed audit log (``app.refuse``, rule ``SITE-APP``, with both hashes) and the
ClientApp process answers the coordinator with an error naming the hash. Approvals
live in ``SITE_DIR/approved-apps.jsonl``; a store the check cannot read refuses every
app (fail closed).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmeta.durable import append_json_line
from fedmeta.paths import APP_APPROVALS as APPROVALS_FILE
from fedmeta.paths import SITE_AUDIT_KEY as AUDIT_KEY
from fedmeta.paths import SITE_AUDIT_LOG as AUDIT_LOG

RULE = "SITE-APP"
KINDS = ("fab_sha256", "release_sha256")
SITE_PACKAGES = ("clients/", "fedmeta/", "policies/")
SERVER_ONLY = "server/"
MAX_UNPACKED = 256 * 1024 * 1024  # refuse a FAB that would inflate beyond this
_HEX64 = re.compile(r"[0-9a-f]{64}")


class AppApprovalError(ValueError):
    """A hash, FAB or approval store that cannot be used; one line."""


class AppNotApproved(RuntimeError):  # noqa: N818 (Flower shows the class name to the server)
    """The site refuses the run's app; the message names the hash."""


def normalize_hash(value: str, what: str = "--fab-hash") -> str:
    """``value`` as 64 lowercase hex digits, or a one-line error."""
    if not isinstance(value, str):
        raise AppApprovalError(
            f"{what}: expected a SHA-256 (64 hex digits), got {type(value).__name__}"
        )
    text = value.strip().lower()
    if text.startswith("sha256:"):
        text = text[len("sha256:") :]
    if not _HEX64.fullmatch(text):
        shown = value if len(value) <= 80 else value[:77] + "..."
        raise AppApprovalError(
            f"{what}: {shown!r} is not a SHA-256 (64 hex digits, as `sha256sum FILE.fab` prints)"
        )
    return text


def fab_sha256(fab: bytes) -> str:
    return hashlib.sha256(fab).hexdigest()


def release_digest(fab: bytes) -> str:
    """The release digest of a FAB (see the module's doc): what can run at a site."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(fab))
        infos = [i for i in archive.infolist() if not i.is_dir()]
        if sum(i.file_size for i in infos) > MAX_UNPACKED:
            raise AppApprovalError(f"the FAB would unpack to more than {MAX_UNPACKED} bytes")
        h = hashlib.sha256()
        ref = None
        for info in sorted(infos, key=lambda i: i.filename):
            name = info.filename
            if name == "pyproject.toml":
                config = tomllib.loads(archive.read(info).decode("utf-8"))
                ref = config["tool"]["flwr"]["app"]["components"]["clientapp"]
                continue
            if name.startswith(SERVER_ONLY):
                continue
            if name.endswith(".py") or name.startswith(SITE_PACKAGES):
                h.update(f"{name}\0{hashlib.sha256(archive.read(info)).hexdigest()}\n".encode())
    except AppApprovalError:
        raise
    except (
        zipfile.BadZipFile,
        KeyError,
        TypeError,
        ValueError,
        UnicodeDecodeError,
        tomllib.TOMLDecodeError,
        OSError,
        EOFError,
        RuntimeError,
    ) as exc:
        raise AppApprovalError(
            f"not a readable Flower app bundle ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(ref, str):
        raise AppApprovalError(
            "not a Flower app bundle: its pyproject.toml names no "
            "[tool.flwr.app.components] clientapp"
        )
    h.update(f"clientapp\0{ref}\n".encode())
    return h.hexdigest()


def build_release_fab(root: Path) -> bytes:
    """The FAB of the app in ``root`` (a fedmeta source tree), built by Flower's own
    builder exactly as ``flwr run`` builds it."""
    root = Path(root)
    pyproject = root / "pyproject.toml"
    try:
        config = tomllib.loads(pyproject.read_text(encoding="utf-8"))
        config["tool"]["flwr"]["app"]["components"]["clientapp"]
    except (OSError, KeyError, TypeError, tomllib.TOMLDecodeError):
        raise AppApprovalError(
            f"{root}: not a fedmeta source tree (no pyproject.toml with [tool.flwr.app]): "
            "give the unpacked release with --release DIR, or approve the coordinator's "
            "app with --fab FILE or --fab-hash HEX"
        ) from None
    from flwr.cli.build import build_fab_from_files

    try:
        return build_fab_from_files(_app_files(root))[0]
    except ValueError as exc:
        raise AppApprovalError(f"{root}: Flower cannot build its app bundle: {exc}") from None


def _app_files(root: Path) -> dict[str, Path]:
    """What Flower's ``build_fab_from_disk`` hands its builder (``collect_files``: every
    file under ``root`` that is no symlink and resolves inside it, by relative POSIX
    path), without walking the directories whose every file Flower's publish rules then
    drop (``APP_PUBLISH_EXCLUDE_PATTERNS``: the app's ``.venv/`` and ``.flwr/``, any
    ``__pycache__/``). A source tree's virtual environment holds tens of thousands of
    files, which took seconds to list; the FAB is the same, byte for byte."""
    from flwr.supercore.constant import APP_PUBLISH_EXCLUDE_PATTERNS as EXCLUDED

    root = root.expanduser().resolve()
    top = {d for d in (".venv", ".flwr") if f"{d}/**" in EXCLUDED}
    anywhere = {"__pycache__"} if "**/__pycache__/**" in EXCLUDED else set()
    files: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if d not in anywhere and not (here == root and d in top)]
        for filename in filenames:
            path = here / filename
            if path.is_symlink() or not path.resolve().is_relative_to(root):
                continue
            files[path.relative_to(root).as_posix()] = path
    return files


@dataclass(frozen=True)
class Approval:
    kind: str  # one of KINDS
    sha256: str
    source: str
    approved_at: float


def read_approvals(site_dir: Path) -> list[Approval]:
    """The site's approvals; a missing store is empty, a damaged one an error."""
    path = Path(site_dir) / APPROVALS_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise AppApprovalError(f"{path}: unreadable ({exc})") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            kind = next(k for k in KINDS if k in row)
            out.append(
                Approval(
                    kind,
                    normalize_hash(row[kind], f"{path} line {n}"),
                    str(row.get("source", "")),
                    float(row.get("approved_at", 0)),
                )
            )
        except (ValueError, TypeError, StopIteration, AttributeError):
            raise AppApprovalError(
                f"{path} line {n}: not an approval (a JSON object with fab_sha256 or "
                "release_sha256): fix or remove the line, then approve again"
            ) from None
    return out


def approve(site_dir: Path, kind: str, digest: str, source: str) -> bool:
    """Record an approval (``kind`` in :data:`KINDS`); False when it was already there."""
    if kind not in KINDS:
        raise AppApprovalError(f"unknown approval kind {kind!r}")
    digest = normalize_hash(digest)
    site_dir = Path(site_dir)
    if not site_dir.is_dir():
        raise AppApprovalError(f"{site_dir}: not a directory (run `fedmeta node init` first)")
    if any(a.kind == kind and a.sha256 == digest for a in read_approvals(site_dir)):
        return False
    row = {kind: digest, "source": source, "approved_at": round(time.time(), 3)}
    append_json_line(site_dir / APPROVALS_FILE, row)
    return True


@dataclass(frozen=True)
class Decision:
    approved: bool
    fab_sha256: str
    release_sha256: str | None
    reason: str


def check_fab(site_dir: Path, fab: bytes, claimed_hash: str | None = None) -> Decision:
    """May this site run ``fab``? Never raises for a bad FAB or store: it refuses."""
    digest = fab_sha256(fab)
    if claimed_hash is not None and claimed_hash.lower() != digest:
        return Decision(
            False,
            digest,
            None,
            f"the FAB's content hashes to {digest}, not "
            f"to the hash it was sent under ({claimed_hash[:80]})",
        )
    try:
        release = release_digest(fab)
    except AppApprovalError as exc:
        release, problem = None, str(exc)
    else:
        problem = None
    try:
        approvals = read_approvals(site_dir)
    except AppApprovalError as exc:
        return Decision(False, digest, release, f"approval store unusable: {exc}")
    if any(a.kind == "fab_sha256" and a.sha256 == digest for a in approvals):
        return Decision(True, digest, release, "approved FAB hash")
    if release is not None and any(
        a.kind == "release_sha256" and a.sha256 == release for a in approvals
    ):
        return Decision(True, digest, release, "approved release")
    why = f" ({problem})" if problem else ""
    return Decision(
        False,
        digest,
        release,
        f"app sha256 {digest} is not approved by this "
        f"site{why}: if its DPO accepts it, `fedmeta node approve-app SITE_DIR "
        f"--fab-hash {digest}`",
    )


def record_refusal(
    site_dir: Path,
    site_id: str,
    run_id: str,
    decision: Decision,
    fab_id: str = "",
    fab_version: str = "",
) -> str | None:
    """Append ``app.refuse`` to the site's signed audit log; its receipt, if any."""
    from fedmeta.audit import AuditLog

    with AuditLog.open(
        Path(site_dir) / AUDIT_LOG, Path(site_dir) / AUDIT_KEY, actor=site_id
    ) as log:
        log.append(
            "app.refuse",
            run_id=run_id,
            decision="deny",
            rule_ids=[RULE],
            details={
                "fab_sha256": decision.fab_sha256,
                "release_sha256": decision.release_sha256,
                "fab_id": fab_id[:200],
                "fab_version": fab_version[:100],
                "reason": decision.reason[:500],
            },
        )
        head = log.head()
    return str(head) if head else None


def install_in_clientapp() -> None:
    """In a ClientApp process (``python -m fedmeta.deploy.lifeline clientapp``): check the
    run's FAB before Flower installs it; refuse, on record, an unapproved one."""
    import flwr.supernode.runtime.run_clientapp as rc

    if not (
        callable(getattr(rc, "pull_task_input", None))
        and callable(getattr(rc, "install_from_fab", None))
    ):
        raise RuntimeError(
            "the installed Flower's ClientApp process pulls or installs the "
            "app differently: this fedmeta release cannot check it; install "
            "the Flower version of the coordinator's constraints file"
        )
    pull, install = rc.pull_task_input, rc.install_from_fab
    task: dict[str, Any] = {}

    def pull_task_input(client: Any) -> Any:
        message, context, run, fab = pull(client)
        task.update(context=context, run=run, fab=fab)
        return message, context, run, fab

    def install_from_fab(fab_file: Any, *args: Any, **kwargs: Any) -> Any:
        context, run, fab = task.get("context"), task.get("run"), task.get("fab")
        content = fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes()
        node_config = dict(getattr(context, "node_config", None) or {})
        run_id = str(getattr(run, "run_id", "-"))
        if "site-dir" not in node_config:
            raise AppNotApproved(
                "this node has no site-dir in its --node-config: it cannot "
                "check the app and refuses it"
            )
        site_dir = Path(str(node_config["site-dir"]))
        site_id = str(node_config.get("site-id", site_dir.name))
        decision = check_fab(site_dir, content, getattr(fab, "hash_str", None))
        if not decision.approved:
            try:
                record_refusal(
                    site_dir,
                    site_id,
                    run_id,
                    decision,
                    str(getattr(run, "fab_id", "")),
                    str(getattr(run, "fab_version", "")),
                )
            except Exception as exc:  # noqa: BLE001 (refuse all the same, and say why)
                raise AppNotApproved(
                    f"site {site_id} refuses run {run_id}: "
                    f"{decision.reason}; its audit log could not record "
                    f"it: {exc}"
                ) from None
            raise AppNotApproved(f"site {site_id} refuses run {run_id}: {decision.reason}")
        return install(fab_file, *args, **kwargs)

    rc.pull_task_input = pull_task_input  # type: ignore[attr-defined]
    rc.install_from_fab = install_from_fab  # type: ignore[attr-defined]
