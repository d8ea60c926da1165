"""The rule interface and the decision every rule returns.

A rule is a small class with a legal identity and one method:

=========  ==============================================  ===================================
level      answers                                         method
=========  ==============================================  ===================================
run        may this run go ahead with these sites?          ``evaluate(run, sites)`` -> list
round      may this round go ahead with the sites sampled?  ``evaluate(run, sites)`` -> list
site       may this site take part in this run?             ``evaluate(run, site, columns)``
record     must this record be left out of this round?      ``applies(run, site)`` and
                                                            ``excludes(record, run, site, at)``
=========  ==============================================  ===================================

Every rule names its ``id`` (``GDPR-9-2``), its legal ``references``
("GDPR Art. 9(2)(j)"), how firmly its reading rests on the text (``confidence``,
docs/compliance.md), and a plain-language
``description`` that says "(interpretation)" where the mapping from the law to
the check is fedmeta's reading rather than the text.

A :class:`Decision` is evidence: outcome (allow / allow-with-exclusions /
deny), rule id, references, a one-line reason, counts of excluded records by
rule and flags such as ``conflict``. For record-level rules it also holds the
mask of records the rule excludes, which stays on the node: ``to_dict()``
never writes it, only counts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from policies.declarations import RunDeclaration, SiteManifest
    from policies.records import RecordMeta


class Level(StrEnum):
    RUN = "run"
    ROUND = "round"
    SITE = "site"
    RECORD = "record"


class Outcome(StrEnum):
    ALLOW = "allow"
    ALLOW_WITH_EXCLUSIONS = "allow-with-exclusions"
    DENY = "deny"


CONFLICT = "conflict"
"""Flag: two applicable laws pull in opposite directions; a person must decide."""
NON_PRIVATE = "non-private"
"""Flag: the run was explicitly declared to train without differential privacy."""


@dataclass(frozen=True)
class Decision:
    """One rule's decision about a run, a round, a site or a site's records."""

    rule_id: str
    outcome: Outcome
    references: tuple[str, ...]
    reason: str
    level: Level
    site_id: str | None = None
    exclusions: Mapping[str, int] = field(default_factory=dict, hash=False)
    """rule id -> number of records excluded (record-level rules only)."""
    flags: tuple[str, ...] = ()
    excluded_mask: tuple[bool, ...] | None = field(default=None, repr=False, compare=False)
    """Which records this rule excludes (True = excluded). Local to the node:
    never serialised."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "outcome", Outcome(self.outcome))
        object.__setattr__(self, "level", Level(self.level))
        object.__setattr__(self, "references", tuple(self.references))
        object.__setattr__(self, "flags", tuple(self.flags))
        object.__setattr__(self, "exclusions", dict(self.exclusions))
        if "\n" in self.reason or "\r" in self.reason:
            raise ValueError("a decision's reason must be one line")

    @property
    def allowed(self) -> bool:
        return self.outcome is not Outcome.DENY

    @property
    def denied(self) -> bool:
        return self.outcome is Outcome.DENY

    @property
    def conflict(self) -> bool:
        return CONFLICT in self.flags

    def to_dict(self) -> dict[str, Any]:
        """The canonical serialisation: JSON-ready, counts only, never the mask."""
        return {
            "rule_id": self.rule_id,
            "outcome": self.outcome.value,
            "level": self.level.value,
            "site_id": self.site_id,
            "references": list(self.references),
            "reason": self.reason,
            "exclusions": {k: int(self.exclusions[k]) for k in sorted(self.exclusions)},
            "flags": sorted(self.flags),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Decision:
        """Inverse of :meth:`to_dict` (the mask, never serialised, is None).

        The input is untrusted (a file): a field of the wrong type is a ``ValueError``
        naming the field, never a later crash."""
        if not isinstance(data, Mapping):
            raise ValueError("a decision must be an object")
        for name in ("rule_id", "outcome", "level", "reason"):
            if not isinstance(data.get(name), str):
                raise ValueError(f"decision field {name!r} must be a string")
        if data.get("site_id") is not None and not isinstance(data["site_id"], str):
            raise ValueError("decision field 'site_id' must be a string or null")
        for name in ("references", "flags"):
            value = data.get(name, [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"decision field {name!r} must be a list of strings")
        exclusions = data.get("exclusions", {})
        if not isinstance(exclusions, Mapping) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
            for k, v in exclusions.items()
        ):
            raise ValueError("decision field 'exclusions' must map rule ids to counts")
        return cls(
            rule_id=data["rule_id"],
            outcome=Outcome(data["outcome"]),
            level=Level(data["level"]),
            site_id=data.get("site_id"),
            references=tuple(data.get("references", ())),
            reason=data["reason"],
            exclusions=dict(exclusions),
            flags=tuple(data.get("flags", ())),
        )


@dataclass(frozen=True)
class Columns:
    """The feature columns a trainer will read, and those the site declares (or None)."""

    read: tuple[str, ...]
    declared: tuple[str, ...] | None


class Rule(ABC):
    """What every rule says about itself, and helpers to write its decision."""

    id: ClassVar[str]
    pack: ClassVar[str]
    """"gdpr", "dpdp" or "privacy"."""
    level: ClassVar[Level]
    references: ClassVar[tuple[str, ...]]
    description: ClassVar[str]
    confidence: ClassVar[str] = ""
    """Confidence tag(s): V seen in the text, S secondary source, K standard knowledge,
    U interpretation (docs/compliance.md)."""

    def decision(
        self,
        outcome: Outcome,
        reason: str,
        site: SiteManifest | None = None,
        *,
        exclusions: Mapping[str, int] | None = None,
        flags: Sequence[str] = (),
        excluded_mask: tuple[bool, ...] | None = None,
    ) -> Decision:
        return Decision(
            rule_id=self.id,
            outcome=outcome,
            references=self.references,
            reason=reason,
            level=self.level,
            site_id=site.site_id if site is not None else None,
            exclusions=exclusions or {},
            flags=tuple(flags),
            excluded_mask=excluded_mask,
        )

    def allow(
        self, reason: str, site: SiteManifest | None = None, flags: Sequence[str] = ()
    ) -> Decision:
        return self.decision(Outcome.ALLOW, reason, site, flags=flags)

    def deny(
        self, reason: str, site: SiteManifest | None = None, flags: Sequence[str] = ()
    ) -> Decision:
        return self.decision(Outcome.DENY, reason, site, flags=flags)


class RunRule(Rule):
    """A rule about the run as a whole, with all its sites (checked by the server)."""

    level = Level.RUN

    @abstractmethod
    def evaluate(self, run: RunDeclaration, sites: Sequence[SiteManifest]) -> list[Decision]:
        """One decision per site concerned, or one for the whole run."""


class RoundRule(RunRule):
    """A rule about one round, with the sites sampled for it (checked by the server)."""

    level = Level.ROUND


class GateRule(Rule):
    """A rule about the run as it will really happen: evaluated by the server after every
    other run and site rule, over the sites that remain eligible, with what the server
    knows of the transport (None where it does not). A denial stops the run."""

    level = Level.RUN

    @abstractmethod
    def gate(
        self, run: RunDeclaration, sites: Sequence[SiteManifest], transport: str | None, today: date
    ) -> list[Decision]:
        """The gate's decisions (a denial names the run, not a site)."""


class SiteRule(Rule):
    """A rule about one site taking part in a run (checked by the server and the node)."""

    level = Level.SITE

    @abstractmethod
    def evaluate(
        self, run: RunDeclaration, site: SiteManifest, columns: Columns | None = None
    ) -> Decision | None:
        """The decision, or None where the rule has nothing to check here
        (e.g. the minimisation rule when no column list is given)."""


class RecordRule(Rule):
    """A rule that leaves some of a site's records out of a round (checked by the node)."""

    level = Level.RECORD
    applies_when: ClassVar[str] = "always"
    """When the rule applies, in words (for the reason of a decision)."""
    excluded_because: ClassVar[str]
    """Why a record is left out, in words (for the reason of a decision)."""

    def applies(self, run: RunDeclaration, site: SiteManifest) -> bool:
        return True

    @abstractmethod
    def excludes(
        self, record: RecordMeta, run: RunDeclaration, site: SiteManifest, at: datetime
    ) -> bool:
        """True if this record must be left out of the round at time ``at``."""
