"""Read a site's rights register: ``<site-dir>/rights-register.csv``.

One row per request, pseudonymous::

    request_id,type,law,received,decision,ground,decided,extended,erased_at_source,effect_on_models
    R-2026-001,erasure,gdpr,2026-03-02,granted,,2026-03-20,false,true,excluded from later rounds
    R-2026-002,objection,gdpr,2026-04-11,refused,GDPR Art. 21(6) public task,2026-05-02,,,
    R-2026-003,grievance,dpdp,2026-06-01,pending,,,,,

Types, laws and decisions: see ``policies.rights``. Dates are ISO 8601; yes/no cells
as in ``fedmeta.data.record_columns`` (empty = no); empty ``decision`` means
pending. Errors name the file, line and column; nothing is guessed.
"""

from __future__ import annotations

import csv
from datetime import date
from pathlib import Path

from fedmeta.data.record_columns import FALSE_WORDS, TRUE_WORDS
from policies.rights import RightsRequest

REGISTER_FILE = "rights-register.csv"
COLUMNS = (
    "request_id",
    "type",
    "law",
    "received",
    "decision",
    "ground",
    "decided",
    "extended",
    "erased_at_source",
    "effect_on_models",
)


class RightsRegisterError(ValueError):
    """The register is malformed (one line, names file/line/column)."""


def _date(column: str, text: str) -> date | None:
    if not text:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise ValueError(f"column {column!r}: {text!r} is not a date (YYYY-MM-DD)") from None


def _bool(column: str, text: str) -> bool:
    low = text.lower()
    if low in TRUE_WORDS:
        return True
    if low in FALSE_WORDS or not low:
        return False
    raise ValueError(f"column {column!r}: expected true/false, yes/no, y/n or 1/0, got {text!r}")


def _request(row: dict[str, str]) -> RightsRequest:
    cell = {k: (v or "").strip() for k, v in row.items() if k}
    received = _date("received", cell.get("received", ""))
    if received is None:
        raise ValueError("column 'received': the date the request was received is required")
    if not cell.get("request_id"):
        raise ValueError("column 'request_id': required (a pseudonymous request id)")
    return RightsRequest(
        request_id=cell["request_id"],
        type=cell.get("type", ""),
        law=cell.get("law", ""),
        received=received,
        decision=cell.get("decision") or "pending",
        ground=cell.get("ground") or None,
        decided=_date("decided", cell.get("decided", "")),
        extended=_bool("extended", cell.get("extended", "")),
        erased_at_source=_bool("erased_at_source", cell.get("erased_at_source", "")),
        effect_on_models=cell.get("effect_on_models") or None,
    )


def load_rights_register(site_dir: Path) -> list[RightsRequest] | None:
    """The site's requests, or None when it keeps no register file."""
    path = Path(site_dir) / REGISTER_FILE
    if not path.exists():
        return None
    out: list[RightsRequest] = []
    seen: dict[str, int] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            missing = [c for c in ("request_id", "type", "law", "received") if c not in header]
            unknown = [c for c in header if c not in COLUMNS]
            if missing or unknown:
                raise RightsRegisterError(
                    f"{path} line 1: header must have {', '.join(COLUMNS[:4])} and only "
                    f"{', '.join(COLUMNS)} (missing: {missing}, unknown: {unknown})"
                )
            for line, row in enumerate(reader, start=2):
                try:
                    req = _request(row)
                except ValueError as exc:
                    raise RightsRegisterError(f"{path} line {line}: {exc}") from None
                if req.request_id in seen:
                    raise RightsRegisterError(
                        f"{path} line {line}, column 'request_id': duplicate of line "
                        f"{seen[req.request_id]}"
                    )
                seen[req.request_id] = line
                out.append(req)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise RightsRegisterError(f"{path}: cannot read the rights register ({exc})") from None
    return out
