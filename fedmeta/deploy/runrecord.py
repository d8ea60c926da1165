"""One directory per run, and the run's public record kept at every site that took part.

Run directory. ``out-dir`` may hold ``{run}``, which the server replaces with the
run's id (``/srv/fedmeta/runs/{run}``): each run then gets a directory of its own
and two runs never mix their metrics or logs. The deployment's ``run.toml`` and
the app's default (``pyproject.toml``) use it.

Run record. When a run ends the server sends every site that took part, with the
final head it anchors there (``run.anchor``), the run's public record: the
server's signed audit log, its public key, ``config.json``,
``policy-decisions.json`` (the run-level decisions and the sites' public
manifests) and ``metrics.jsonl`` (per round: who took part, each site's released
epsilon and suppressed exclusion counts). Nothing in it comes from a site's
private data beyond what every round already released. The site keeps it in
``<site-dir>/runs/<run-id>/`` after checking that the server log verifies, ends
at the head it was sent and (where the site kit pins one) is signed by the
federation's server key; the outcome is in the site's own signed log
(``run.record``). With its own log, ledger and manifest this is what
``fedmeta report --site-dir SITE_DIR --run RUN_ID`` needs: a site reports on a
run from its own directory, without asking the coordinator.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from fedmeta.audit import AuditError, AuditLog, Receipt, read_log
from fedmeta.paths import (
    AUDIT_DIR,
    CONFIG_FILE,
    DECISIONS_FILE,
    KEYS_DIR,
    METRICS_FILE,
    PINNED_SERVER_KEY,
    RUNS_DIR,
    SERVER_AUDIT_LOG,
    SERVER_AUDIT_PUBKEY,
)

RUN_PLACEHOLDER = "{run}"
RECORD_FILES = {  # message key -> file in <site-dir>/runs/<run-id>/ (and in a run directory)
    "record-server-log": SERVER_AUDIT_LOG.as_posix(),
    "record-server-key": SERVER_AUDIT_PUBKEY.as_posix(),
    "record-config": CONFIG_FILE,
    "record-decisions": DECISIONS_FILE,
    "record-metrics": METRICS_FILE,
}
MAX_RECORD_BYTES = 32 * 1024 * 1024  # per file
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}")


class RunRecordError(ValueError):
    """A run record cannot be kept or found (one line, names what and why)."""


def out_dir_for(out_dir: str, run_id: str) -> str:
    """``out_dir`` with ``{run}`` replaced by the run id (unchanged without it)."""
    return out_dir.replace(RUN_PLACEHOLDER, run_id)


def check_run_id(run_id: str) -> str:
    """A run id safe as a directory name (never ``.``/``..`` or a path)."""
    if not _RUN_ID.fullmatch(run_id or "") or set(run_id) <= {"."}:
        raise RunRecordError(
            f"run id {run_id!r}: not a fedmeta run id (letters, digits, '._:+-', at most 128)"
        )
    return run_id


def run_record_dir(site_dir: Path, run_id: str) -> Path:
    return Path(site_dir) / RUNS_DIR / check_run_id(run_id)


def record_for_sites(out: Path) -> dict[str, str]:
    """The run's public record (message key -> file text), read from the run directory."""
    record = {}
    for key, rel in RECORD_FILES.items():
        path = Path(out) / rel
        if path.is_file():
            record[key] = path.read_text(encoding="utf-8")
    return record


def _pinned_server_key(site_dir: Path) -> Path | None:
    path = Path(site_dir) / PINNED_SERVER_KEY
    return path if path.is_file() else None


def keep_run_record(site_dir: Path, run_id: str, head: Receipt, sent: Any, log: AuditLog) -> str:
    """Check and keep the run record the server sent with its final head; audit the outcome
    (``run.record``) in the site's ``log``. Returns '' when kept, else why not (the site
    keeps nothing then)."""
    files = {rel: sent.get(key) for key, rel in RECORD_FILES.items()}
    problem = ""
    if not isinstance(files[SERVER_AUDIT_LOG.as_posix()], str):
        problem = "no server log in the run record"
    elif any(isinstance(v, str) and len(v.encode()) > MAX_RECORD_BYTES for v in files.values()):
        problem = f"a file of the run record exceeds {MAX_RECORD_BYTES} bytes"
    try:
        target = run_record_dir(site_dir, run_id)
    except RunRecordError as exc:
        problem = problem or str(exc)
        target = None
    digest = ""
    if not problem and target is not None:
        tmp = target.with_name(target.name + ".incoming")
        (tmp / AUDIT_DIR).mkdir(parents=True, exist_ok=True)
        (tmp / KEYS_DIR).mkdir(parents=True, exist_ok=True)
        for rel, text in files.items():
            if isinstance(text, str):
                (tmp / rel).write_text(text, encoding="utf-8")
        server_log = tmp / SERVER_AUDIT_LOG
        digest = hashlib.sha256(server_log.read_bytes()).hexdigest()
        pinned = _pinned_server_key(site_dir)
        try:
            _, result = read_log(server_log, public_key=pinned, receipts=[head])
            if not result.ok:
                problem = f"the server log does not verify: {result.problem}"
            elif result.head != head:
                problem = f"the server log ends at {result.head}, not at the head {head} it sent"
            elif result.actor != "server":
                problem = f"the log's actor is {result.actor!r}, not 'server'"
        except AuditError as exc:
            problem = f"the server log does not verify: {exc}"
        if problem:
            for p in sorted(tmp.rglob("*"), reverse=True):
                p.unlink() if p.is_file() else p.rmdir()
            tmp.rmdir()
        else:
            if target.exists():  # a replayed anchor: keep the first record
                for p in sorted(tmp.rglob("*"), reverse=True):
                    p.unlink() if p.is_file() else p.rmdir()
                tmp.rmdir()
            else:
                tmp.rename(target)
    log.append(
        "run.record",
        run_id=run_id if target is not None else "-",
        decision="deny" if problem else "allow",
        details={
            "server_head": str(head),
            "server_log_sha256": digest or None,
            "server_key": "pinned" if _pinned_server_key(site_dir) else "embedded",
            "kept_in": f"{RUNS_DIR}/{run_id}" if not problem else None,
            "reason": problem[:500] or None,
        },
    )
    return problem
