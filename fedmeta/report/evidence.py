"""Which figures of the report are bound to a signed entry, and whether they agree.

The report shows figures from unsigned files (a site's privacy ledger,
``metrics.jsonl``, ``final_model.pt``, the manifests). Each is compared here
with what the responsible party signed in its audit log:

* a ledger charge (noise multiplier, sample rate, steps, delta, accountant,
  epsilon after the charge, epsilon_max) with the site's ``round.train`` entry
  of that round (the entry fields the sites sign are listed in
  ``fedmeta/site.py``); a field an older site log does not carry is *unsigned*
  and shown as such, never as verified;
* the final model file with the SHA-256 the server signed in ``run.end``
  (``model_file_sha256``; for older logs, the digest of the weights against
  ``run.end``'s ``model_out``);
* ``metrics.jsonl`` (the learning results) with ``run.end``'s ``metrics_sha256``;
* the manifest a site applied with its signed ``manifest_sha256``.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmeta.paths import RunPaths, SitePaths
from fedmeta.report.collect import RunFiles, SiteFiles

# ledger field -> (signed details key, how to read it from the entry)
LEDGER_FIELDS = (
    "noise_multiplier",
    "sample_rate",
    "steps",
    "delta",
    "accountant",
    "epsilon_after",
    "epsilon_max",
)


@dataclass
class LedgerEvidence:
    """A site's ledger compared with its signed ``round.train`` entries."""

    problems: list[str] = field(default_factory=list)
    unsigned: set[str] = field(default_factory=set)  # ledger fields no signed entry holds
    rounds: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-15)
    return a == b


def _signed_value(entry: Any, name: str) -> tuple[bool, Any]:
    """(signed?, value) of one ledger field in a site's round.train entry."""
    d = entry.details
    if name == "epsilon_after":
        return entry.epsilon is not None, entry.epsilon
    if name == "steps":
        if "steps" in d:
            return True, d["steps"]
        return "steps" in entry.counts, entry.counts.get("steps")
    return name in d and d[name] is not None, d.get(name)


def ledger_evidence(files: RunFiles, site: SiteFiles) -> LedgerEvidence:
    """Every charge of the ledger (this run's and earlier runs', which count towards the
    site's total) against the site's signed ``round.train`` entry of that run and round."""
    out = LedgerEvidence()
    if site.ledger is None:
        return out
    trains = {(e.run_id, e.round): e for e in site.log.entries if e.action == "round.train"}
    charged = {(c.run, c.round) for c in site.ledger.charges}
    for c in site.ledger.charges:
        e = trains.get((c.run, c.round))
        if c.run != files.run_id and e is None:  # an earlier run this log does not hold
            out.unsigned.add("earlier runs' charges")
            continue
        out.rounds += c.run == files.run_id
        if e is None or e.details.get("dp") is False:
            out.problems.append(
                f"ledger charge of run {c.run} round {c.round} has no signed DP round.train entry"
            )
            continue
        values = {
            "noise_multiplier": c.noise_multiplier,
            "sample_rate": c.sample_rate,
            "steps": c.steps,
            "delta": site.ledger.delta,
            "accountant": site.ledger.accountant,
            "epsilon_after": c.epsilon_after,
            "epsilon_max": site.ledger.epsilon_max,
        }
        for name in LEDGER_FIELDS:
            signed, value = _signed_value(e, name)
            if not signed:
                out.unsigned.add(name)
            elif not _close(value, values[name]):
                out.problems.append(
                    f"round {c.round}: ledger {name} {values[name]!r}, the site signed {value!r}"
                )
    for (run, r), e in sorted((k, e) for k, e in trains.items() if k[1] is not None):
        if e.details.get("dp") and e.epsilon is not None and (run, r) not in charged:
            out.problems.append(
                f"run {run} round {r}: the site signed a DP round (epsilon "
                f"{e.epsilon:.6g}) that the ledger does not hold (a charge "
                "was dropped)"
            )
    return out


def file_sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_digest(path: Path) -> tuple[str | None, str | None]:
    """(digest of the weights in a model file as the server computed it, error)."""
    try:
        import torch

        from fedmeta.meta.updates import model_digest

        obj = torch.load(path, map_location="cpu", weights_only=True)
        state = obj["state_dict"]
        return model_digest({k: v.detach().cpu().numpy() for k, v in state.items()}), None
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one finding
        return None, f"{path.name}: not a fedmeta model file ({str(exc).splitlines()[0][:160]})"


@dataclass
class ModelEvidence:
    ok: bool
    fatal: bool
    detail: str


def model_evidence(files: RunFiles) -> ModelEvidence | None:
    """The final model file against the server's signed run.end (None: nothing to check)."""
    end = files.run_end
    path = files.model_path
    if end is None:
        if path.exists():
            return ModelEvidence(
                False,
                True,
                f"{path.name} exists but the server's signed log "
                "has no run.end entry naming a final model",
            )
        return None
    if not path.exists():
        return ModelEvidence(
            True, False, f"no {path.name} (run.end names model {end.model_out or '-'})"
        )
    if not path.is_file():
        return ModelEvidence(False, True, f"{path.name}: not a regular file")
    signed = end.details.get("model_file_sha256")
    if isinstance(signed, str):
        got = file_sha256(path)
        if got == signed:
            return ModelEvidence(True, False, f"file sha256 {got} = the signed run.end")
        return ModelEvidence(
            False,
            True,
            f"{path.name} hashes to {got}, the server signed "
            f"{signed} in run.end: the model file was replaced",
        )
    digest, error = weights_digest(path)
    if error:
        return ModelEvidence(False, True, error)
    if digest == end.model_out:
        return ModelEvidence(
            True,
            False,
            f"weights digest {digest} = the signed run.end "
            "model_out (the file's own hash is not signed in "
            "this log)",
        )
    return ModelEvidence(
        False,
        True,
        f"the weights in {path.name} digest to {digest}, the "
        f"server signed {end.model_out} in run.end: the model "
        "file was replaced",
    )


def metrics_signed(files: RunFiles) -> bool | None:
    """True: metrics.jsonl is the file the server signed; False: it differs; None: this
    log signs no hash of it (the learning results are unsigned)."""
    end = files.run_end
    signed = end.details.get("metrics_sha256") if end is not None else None
    if not isinstance(signed, str):
        return None
    return file_sha256(RunPaths(files.run_dir).metrics) == signed


def manifest_hashes(files: RunFiles, site: SiteFiles) -> set[str]:
    """The hashes a manifest the report shows for ``site`` may have (file bytes, or the
    canonical JSON of the manifest the server received)."""
    out: set[str] = set()
    path = SitePaths(site.dir).manifest
    if path.is_file():
        out.add(file_sha256(path) or "")
    m = files.manifests.get(site.site_id) or site.manifest
    if m is not None:
        doc = m.model_dump(mode="json")
        for text in (
            m.model_dump_json(),
            json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False),
            json.dumps(doc, sort_keys=True),
        ):
            out.add(hashlib.sha256(text.encode()).hexdigest())
    return out


def signed_manifest_hashes(files: RunFiles, site: SiteFiles) -> set[str]:
    return {
        str(e.details["manifest_sha256"])
        for e in site.log.entries
        if e.action == "round.train"
        and e.run_id == files.run_id
        and e.details.get("manifest_sha256")
    }
