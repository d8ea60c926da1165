"""The durable privacy ledger of one site.

File: ``<site-dir>/privacy-ledger.jsonl``, one JSON object per line, each line
fsync'd before the call returns::

    {"kind": "header", "site": ..., "epsilon_max": ..., "delta": ..., "accountant": ...,
     "privacy_unit": ..., "created": ...}
    {"kind": "charge", "run": ..., "round": ..., "noise_multiplier": ..., "sample_rate": ...,
     "steps": ..., "delta": ..., "accountant": ..., "epsilon_after": ..., "time": ...}
    {"kind": "budget", "epsilon_max": ..., "time": ...}          # the site changed its budget

The cumulative epsilon is always recomputed by Opacus's accountant from *all*
charges (every run the site ever joined), so a new run or a restarted process
can never reset it. Every epsilon is per privacy unit, the header's
``privacy_unit``: "record" (one row), or what the site's data declares (a unit
column such as ``patient_id``; ``image`` for digits-fewshot); a ledger written
before units existed is per record. A ledger is kept for one unit only: its
per-record charges do not bound a per-patient guarantee, so a site whose data
changes its unit refuses to train on that ledger. A site directory that has a
``site.json`` marker but no ledger, or a ledger that does not parse, is an
error: the site refuses to train.

Check-and-charge is one transaction: :meth:`PrivacyLedger.locked` holds an
exclusive ``flock`` on the ledger file (the same mechanism the audit log uses
for its appends) and re-reads every charge before the budget is checked, so two
processes charging one site cannot both pass the check.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedmeta.durable import append_json_line, fsync_dir, json_line, write_line
from fedmeta.paths import LEDGER_FILE, MARKER_FILE
from fedmeta.privacy.budget import Step, epsilon_merged, merge_steps
from fedmeta.privacy.units import RECORD


class LedgerError(RuntimeError):
    """The ledger is missing, unreadable or inconsistent (one line, names the file)."""


@dataclass(frozen=True)
class Charge:
    run: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    accountant: str
    epsilon_after: float
    time: str

    @property
    def step(self) -> Step:
        return (self.noise_multiplier, self.sample_rate, self.steps)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _append_line(path: Path, obj: dict[str, Any]) -> int:
    """Append one JSON line, fsync'd; returns its size in bytes."""
    return append_json_line(path, obj, compact=True)


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class PrivacyLedger:
    """Append-only record of every DP release of one site."""

    def __init__(
        self, path: Path, header: dict[str, Any], charges: list[Charge], epsilon_max: float
    ) -> None:
        self.path = path
        self.site: str = header["site"]
        self.delta: float = float(header["delta"])
        self.accountant: str = header["accountant"]
        self.privacy_unit: str = str(header.get("privacy_unit", RECORD))
        self.epsilon_max = epsilon_max
        self.charges = charges
        #: PRV's grid is chosen for at least this many steps (``plan_run``); 0: per history
        self.grid_steps = 0
        #: (inode, size, mtime) of the file when ``charges`` were read from it
        self._stamp: tuple[int, int, int] | None = None
        #: the descriptor ``locked`` holds (``charge`` writes through it), else None
        self._locked_fd: int | None = None
        #: steps per (sigma, q), of every charge (key None) or of one run, with the
        #: ``charges`` list and the number of its entries they cover (``_merged``)
        self._merged_cache: dict[
            str | None, tuple[list[Charge], int, dict[tuple[float, float], int]]
        ] = {}

    # ---- opening ---------------------------------------------------------
    @classmethod
    def open(
        cls,
        site_dir: Path,
        *,
        site: str,
        epsilon_max: float,
        delta: float,
        accountant: str,
        privacy_unit: str = RECORD,
        reuse: PrivacyLedger | None = None,
    ) -> PrivacyLedger:
        """Open the site's ledger, creating it (and the site marker) on first use.

        ``reuse``: the ledger this process opened last time; it is taken instead of
        re-reading the file when the file is unchanged since (``unchanged``), then
        checked like a freshly read one.
        """
        site_dir = Path(site_dir)
        path = site_dir / LEDGER_FILE
        marker = site_dir / MARKER_FILE
        if not path.exists():
            if marker.exists():
                raise LedgerError(
                    f"{path}: privacy ledger missing but {marker.name} says this site has "
                    "trained before; restore the ledger from backup — refusing to train"
                )
            site_dir.mkdir(parents=True, exist_ok=True)
            header = {
                "kind": "header",
                "site": site,
                "epsilon_max": epsilon_max,
                "delta": delta,
                "accountant": accountant,
                "privacy_unit": privacy_unit,
                "created": _now(),
            }
            _append_line(path, header)
            marker.write_text(json.dumps({"site": site, "ledger": LEDGER_FILE}) + "\n")
            fsync_dir(site_dir)
        if reuse is not None and reuse.path == path and reuse.unchanged():
            ledger = reuse
        else:
            ledger = cls.read(path)
        if ledger.delta != delta or ledger.accountant != accountant:
            raise LedgerError(
                f"{path}: ledger is kept at delta={ledger.delta} with the "
                f"{ledger.accountant!r} accountant; this run asks delta={delta}, "
                f"{accountant!r}: use the ledger's values"
            )
        if ledger.privacy_unit != privacy_unit:
            raise LedgerError(
                f"{path}: ledger is kept per {ledger.privacy_unit!r} but this site's data now "
                f"names the privacy unit {privacy_unit!r}; its charges do not bound a guarantee "
                f"per {privacy_unit!r}: restore the site's unit, or train under a new site "
                "directory — refusing to train"
            )
        if ledger.epsilon_max != epsilon_max:
            _append_line(path, {"kind": "budget", "epsilon_max": epsilon_max, "time": _now()})
            ledger.epsilon_max = epsilon_max
        return ledger

    def unchanged(self) -> bool:
        """Whether the file still is what this object last read or wrote (append-only:
        the same inode, size and modification time mean the same lines)."""
        try:
            return self._stamp is not None and _stamp(os.stat(self.path)) == self._stamp
        except OSError:
            return False

    @staticmethod
    def kept_accountant(site_dir: Path) -> str | None:
        """The accountant an existing ledger is kept with (None when there is no ledger)."""
        path = Path(site_dir) / LEDGER_FILE
        if not path.exists():
            return None
        try:  # the header alone (the whole file is checked when the ledger is opened)
            with open(path, encoding="utf-8") as fh:
                header = json.loads(fh.readline())
            if header.get("kind") == "header" and isinstance(header.get("accountant"), str):
                return header["accountant"]
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            pass
        return PrivacyLedger.read(path).accountant  # names the problem

    @classmethod
    def read(cls, path: Path) -> PrivacyLedger:
        """Parse a ledger file; LedgerError naming file and line on any problem."""
        path = Path(path)
        try:
            stamp = _stamp(os.stat(path))
            raw = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise LedgerError(
                f"{path}: cannot read privacy ledger ({exc}); refusing to train"
            ) from None
        header: dict[str, Any] | None = None
        charges: list[Charge] = []
        epsilon_max = None
        lines = raw.split("\n")
        if lines[-1] != "":
            raise LedgerError(
                f"{path} line {len(lines)}: incomplete last line (interrupted "
                "write?); inspect the file — refusing to train"
            )
        for no, line in enumerate(lines[:-1], start=1):
            try:
                obj = json.loads(line)
                kind = obj["kind"]
                if no == 1:
                    if kind != "header":
                        raise ValueError("first line must be the header")
                    header = obj
                    epsilon_max = float(obj["epsilon_max"])
                    str(obj["site"]), float(obj["delta"]), str(obj["accountant"])
                    if not isinstance(obj.get("privacy_unit", RECORD), str):
                        raise ValueError("privacy_unit must be a string")
                elif kind == "charge":
                    fields = {k: obj[k] for k in Charge.__dataclass_fields__}
                    charge = Charge(**fields)
                    if charge.steps < 0 or not 0 < charge.sample_rate <= 1:
                        raise ValueError("steps/sample_rate out of range")
                    charges.append(charge)
                elif kind == "budget":
                    epsilon_max = float(obj["epsilon_max"])
                else:
                    raise ValueError(f"unknown kind {kind!r}")
            except (ValueError, KeyError, TypeError) as exc:
                raise LedgerError(
                    f"{path} line {no}: unreadable ledger entry ({exc}); refusing to train"
                ) from None
        if header is None or epsilon_max is None:
            raise LedgerError(f"{path}: empty privacy ledger; refusing to train")
        ledger = cls(path, header, charges, epsilon_max)
        ledger._stamp = stamp  # taken before reading: a later append always shows
        return ledger

    @contextmanager
    def locked(self) -> Iterator[PrivacyLedger]:
        """Exclusive lock on the ledger file, charges re-read from disk inside it.

        Hold it across :meth:`would_exceed` and :meth:`charge`: another process
        (or thread) charging the same site waits until the lock is released.
        """
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            # the file is append-only: unchanged (inode, size, mtime) means the same charges
            if self._stamp is None or _stamp(os.fstat(fd)) != self._stamp:
                fresh = PrivacyLedger.read(self.path)
                self.charges, self._stamp = fresh.charges, fresh._stamp
            self._locked_fd = fd
            yield self
        finally:
            self._locked_fd = None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    # ---- accounting --------------------------------------------------------
    def plan_run(self, run: str, steps_in_run: int) -> None:
        """Evaluate this run's epsilons on one PRV grid: the one for every step charged
        outside ``run`` plus ``steps_in_run`` (the most the run can charge). A grid for
        more steps is wider and finer: the same upper bound; one grid for the run means
        each round adds one composition instead of discretising its PRVs again."""
        self.grid_steps = sum(c.steps for c in self.charges if c.run != run) + int(steps_in_run)

    def run_epsilon(self, run: str, extra: list[Step] | None = None) -> float:
        """Epsilon spent in one run (plus ``extra``), by the same accountant."""
        merged = self._merged(run)
        return epsilon_merged(merged, extra or (), self.delta, self.accountant, self.grid_steps)

    def _merged(self, run: str | None = None) -> dict[tuple[float, float], int]:
        """Steps per (sigma, q) over every charge (or ``run``'s), kept between calls:
        ``charges`` only grows at its end until it is replaced by a fresh read."""
        kept = self._merged_cache.get(run)
        # the very list (held, not its id: a new list could reuse a freed one's id)
        if kept is not None and kept[0] is self.charges and kept[1] <= len(self.charges):
            merged = kept[2]
            new = self.charges[kept[1] :]
        else:
            merged, new = {}, self.charges
        merge_steps((c.step for c in new if run is None or c.run == run), merged)
        self._merged_cache[run] = (self.charges, len(self.charges), merged)
        return merged

    def charged(self, run: str, round: int) -> bool:
        """Whether this run's round has been charged already (a replayed round)."""
        return any(c.run == run and c.round == round for c in self.charges)

    @property
    def history(self) -> list[Step]:
        return [c.step for c in self.charges]

    def epsilon(self, extra: list[Step] | None = None) -> float:
        """Cumulative epsilon over every charge (plus ``extra`` if given)."""
        return epsilon_merged(
            self._merged(), extra or (), self.delta, self.accountant, self.grid_steps
        )

    def would_exceed(self, step: Step) -> tuple[bool, float]:
        """(True if charging ``step`` would pass epsilon_max, epsilon after it)."""
        after = self.epsilon([step])
        return after > self.epsilon_max, after

    def charge(self, run: str, round: int, step: Step) -> Charge:
        """Durably record one round's DP release; returns the entry."""
        sigma, q, steps = step
        c = Charge(
            run=run,
            round=round,
            noise_multiplier=float(sigma),
            sample_rate=float(q),
            steps=int(steps),
            delta=self.delta,
            accountant=self.accountant,
            epsilon_after=self.epsilon([step]),
            time=_now(),
        )
        record = {"kind": "charge", **asdict(c)}
        fd = self._locked_fd
        if fd is None:
            size = _append_line(self.path, record)
        else:  # under ``locked``: through the descriptor it holds
            size = write_line(fd, json_line(record, compact=True))
        self.charges.append(c)
        # still what the file holds if the file grew by exactly this line
        after = _stamp(os.stat(self.path) if fd is None else os.fstat(fd))
        if self._stamp is not None and (after[0], after[1]) == (
            self._stamp[0],
            self._stamp[1] + size,
        ):
            self._stamp = after
        else:
            self._stamp = None
        return c

    def summary(self) -> dict[str, Any]:
        """The document `fedmeta ledger show --json` prints."""
        return {
            "site": self.site,
            "epsilon_max": self.epsilon_max,
            "delta": self.delta,
            "accountant": self.accountant,
            "privacy_unit": self.privacy_unit,
            "epsilon": self.epsilon(),
            "entries": [
                {
                    k: getattr(c, k)
                    for k in (
                        "run",
                        "round",
                        "noise_multiplier",
                        "sample_rate",
                        "steps",
                        "epsilon_after",
                    )
                }
                for c in self.charges
            ],
        }
