"""Where a federation's model came from, checked against the run's signed audit log.

The server's ``run.end`` entry names the final model's hash (``model_out``) and
is hash-chained and Ed25519-signed. A new site checks the whole log (with the
server's public key when it has one pinned, else the key embedded in the log:
trust on first use, stated in the provenance), finds the run's ``run.end``
entry and requires the received model's weights to hash to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedmeta.meta.updates import model_digest
from fedmeta.paths import CONFIG_FILE, MODEL_FILE, SERVER_AUDIT_LOG


class ProvenanceError(ValueError):
    """The received model cannot be tied to a signed run (one line, names the file)."""


@dataclass(frozen=True)
class Received:
    """A federation's model as a new site receives it: weights, run config, provenance."""

    state: dict[str, torch.Tensor]
    saved: dict[str, Any]
    config_path: Path
    provenance: dict[str, Any]


def run_files(model: Path) -> tuple[Path, Path, Path]:
    """(final_model.pt, config.json, server audit log) of a run dir or its model file."""
    model = Path(model)
    run_dir = model if model.is_dir() else model.parent
    model_file = model / MODEL_FILE if model.is_dir() else model
    return model_file, run_dir / CONFIG_FILE, run_dir / SERVER_AUDIT_LOG


def state_digest(state: dict[str, torch.Tensor]) -> str:
    return model_digest({k: v.detach().cpu().numpy() for k, v in state.items()})


def receive(model: Path, public_key: Path | None = None, audit_log: Path | None = None) -> Received:
    """Load the federation's model and verify it against the run's signed audit log."""
    from fedmeta.audit.errors import AuditError
    from fedmeta.audit.verify import read_log

    model_file, config_path, default_log = run_files(model)
    log_path = Path(audit_log) if audit_log else default_log
    if not model_file.is_file():
        raise ProvenanceError(
            f"{model_file}: no model file; give a run directory or its {MODEL_FILE}"
        )
    if not config_path.is_file():
        raise ProvenanceError(
            f"{config_path}: the run's config is missing; it names the "
            "task and model the weights belong to"
        )
    try:
        saved = torch.load(model_file, map_location="cpu", weights_only=True)
        state = saved["state_dict"]
    except Exception as exc:
        raise ProvenanceError(
            f"{model_file}: not a fedmeta model file ({type(exc).__name__})"
        ) from None
    if not log_path.is_file():
        raise ProvenanceError(
            f"{log_path}: the run's server audit log is missing; the model's "
            "hash must be checked against its signed run.end entry "
            "(pass --audit-log)"
        )
    try:
        entries, result = read_log(log_path, public_key)
    except (AuditError, OSError, ValueError) as exc:
        raise ProvenanceError(f"{log_path}: {str(exc).splitlines()[0]}") from None
    if not result.ok:
        raise ProvenanceError(f"{log_path}: audit log fails verification: {result.problem}")
    run_id = str(saved.get("run", ""))
    ends = [e for e in entries if e.action == "run.end" and e.run_id == run_id]
    if not ends:
        raise ProvenanceError(f"{log_path}: no signed run.end entry for run {run_id!r}")
    end = ends[-1]
    digest = state_digest(state)
    if end.model_out != digest:
        raise ProvenanceError(
            f"{model_file}: weights hash to {digest[:16]}..., the signed "
            f"run.end entry of run {run_id} names {str(end.model_out)[:16]}...;"
            " this is not the federation's final model"
        )
    provenance = {
        "run_id": run_id,
        "final_model_sha256": digest,
        "audit_entry": {"seq": end.seq, "hash": end.hash, "sig": end.sig, "time": end.time},
        "audit_key_fingerprint": result.key_fingerprint,
        "audit_key_source": result.key_source,
        "audit_head": str(result.head) if result.head else None,
        "task": str(saved.get("task", "")),
        "strategy": str(saved.get("strategy", "")),
    }
    return Received(state, saved, config_path, provenance)
