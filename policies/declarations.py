"""What a run and a site declare about themselves, loaded from TOML.

- :class:`RunDeclaration` is written by the controller(s) of a run and held by
  the server: purpose, lawful basis, Art. 9(2) condition, controllers, where the
  server is, the privacy guarantee offered, retention, minimum sites per round.
- :class:`SiteManifest` is written by one institution and held by its node:
  who it is, its country and role, what data about whom it holds, which purposes
  it approves, its lawful basis or DPDP ground, retention, transfer safeguards,
  its privacy limits and which law packs apply to it.

Both are frozen pydantic models. Load them with :func:`load_run_declaration`
and :func:`load_site_manifest`; anything wrong raises :class:`DeclarationError`
with one line that names the file, the field and what to do, e.g.::

    site.toml: field 'lawful_basis': must be one of a, b, c, d, e, f (got 'g')
"""

from __future__ import annotations

import hashlib
import math
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StringConstraints,
    ValidationError,
    field_serializer,
    model_validator,
)

from policies.dpia import DpiaError, DpiaRecord, load_dpia
from policies.parties import PartyRegistry
from policies.purposes import PURPOSES
from policies.site_policy import SitePrivacyPolicy, canonical_json
from policies.validation import Country, SiteId, check_country, format_validation_error, one_line


class DeclarationError(ValueError):
    """A run declaration or site manifest that cannot be used; the message is one line."""


# ---- vocabulary -------------------------------------------------------------

GdprBasis = Literal["a", "b", "c", "d", "e", "f"]
"""GDPR Art. 6(1): (a) consent, (b) contract, (c) legal obligation, (d) vital
interests, (e) public task, (f) legitimate interests."""

GDPR_BASIS_NAMES: dict[str, str] = {
    "a": "consent",
    "b": "contract",
    "c": "legal obligation",
    "d": "vital interests",
    "e": "public task",
    "f": "legitimate interests",
}

Art9Condition = Literal["a", "g", "h", "i", "j"]
"""GDPR Art. 9(2): (a) explicit consent, (g) substantial public interest, (h)
medicine and care, (i) public interest in public health, (j) research under
Art. 89(1)."""

ART9_NAMES: dict[str, str] = {
    "a": "explicit consent",
    "g": "substantial public interest",
    "h": "preventive medicine, diagnosis, care or treatment",
    "i": "public interest in public health",
    "j": "scientific research (Art. 89(1))",
}

DpdpGround = Literal[
    "consent", "7(a)", "7(b)", "7(c)", "7(d)", "7(e)", "7(f)", "7(g)", "7(h)", "7(i)", "17(2)(b)"
]
"""DPDP Act 2023: consent (s.6), a legitimate use listed in s.7, or the research
exemption of s.17(2)(b). There is no "legitimate interests" ground."""

DPDP_GROUND_NAMES: dict[str, str] = {
    "consent": "consent (s.6)",
    "7(a)": "voluntarily provided for a specified purpose (s.7(a))",
    "7(b)": "State subsidy, benefit, service, certificate, licence or permit (s.7(b))",
    "7(c)": "State function under law (s.7(c))",
    "7(d)": "legal duty to disclose to the State (s.7(d))",
    "7(e)": "compliance with a judgment, decree or order (s.7(e))",
    "7(f)": "medical emergency (s.7(f))",
    "7(g)": "medical treatment or health services during an epidemic or threat to public "
    "health (s.7(g))",
    "7(h)": "disaster or breakdown of public order (s.7(h))",
    "7(i)": "employment (s.7(i))",
    "17(2)(b)": "research, archiving or statistics exemption (s.17(2)(b))",
}

Role = Literal["controller", "joint-controller", "processor"]
LawPack = Literal["gdpr", "dpdp"]
DataCategory = Literal[
    "health",
    "genetic",
    "biometric",
    "racial-or-ethnic-origin",
    "political-opinions",
    "religious-beliefs",
    "trade-union-membership",
    "sex-life-or-orientation",
    "demographic",
    "contact",
    "administrative",
    "location",
    "behavioural",
]
SPECIAL_CATEGORIES: frozenset[str] = frozenset(
    {
        "health",
        "genetic",
        "biometric",
        "racial-or-ethnic-origin",
        "political-opinions",
        "religious-beliefs",
        "trade-union-membership",
        "sex-life-or-orientation",
    }
)
"""The special categories of GDPR Art. 9(1)."""

DataSubject = Literal[
    "patients", "minors", "staff", "research-participants", "relatives", "healthy-volunteers"
]

SCC_PATTERN = re.compile(r"^SCC-2021/914-(C2C|C2P|P2P|P2C)$")
"""A reference to the Standard Contractual Clauses of Decision (EU) 2021/914 and
the module used: controller-to-controller, controller-to-processor, ..."""


# ---- field types ------------------------------------------------------------


def _national_law(value: str) -> str:
    """``"DE: <citation>"`` or ``"EU: <citation>"``: the law and where it applies."""
    head, sep, citation = value.partition(":")
    code = head.strip().upper()
    if not sep or not citation.strip():
        raise ValueError(
            "must name where the law applies and the law, like 'DE: <citation>' or "
            f"'EU: <citation>' (got {value!r})"
        )
    if code != "EU":
        code = check_country(code)
    return f"{code}: {' '.join(citation.split())}"


def law_jurisdiction(law: str) -> str:
    """The ISO country code (or "EU") a :data:`NationalLaw` value applies in."""
    return law.partition(":")[0]


def _purpose(value: str) -> str:
    if value not in PURPOSES:
        raise ValueError(f"must be one of {', '.join(PURPOSES)} (got {value!r})")
    return value


def _scc(value: str) -> str:
    if not SCC_PATTERN.match(value):
        raise ValueError(
            f"must be an SCC reference like SCC-2021/914-C2C (modules C2C, C2P, P2P, P2C) "
            f"(got {value!r})"
        )
    return value


def _safeguard(value: str) -> str:
    if value == "adequacy":
        return value
    if not SCC_PATTERN.match(value):
        raise ValueError(
            "must be 'adequacy' or an SCC reference like SCC-2021/914-C2C "
            f"(modules C2C, C2P, P2P, P2C) (got {value!r})"
        )
    return value


def _email(value: str) -> str:
    if not re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", value):
        raise ValueError(f"must be an e-mail address (got {value!r})")
    return value


Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=500)]
PurposeId = Annotated[str, AfterValidator(_purpose)]
SccReference = Annotated[str, AfterValidator(_scc)]
Safeguard = Annotated[str, AfterValidator(_safeguard)]
Email = Annotated[str, AfterValidator(_email)]
Days = Annotated[StrictInt, Field(gt=0, le=36500)]
Delta = Annotated[StrictFloat, Field(gt=0.0, lt=1.0)]
NationalLaw = Annotated[str, StringConstraints(max_length=500), AfterValidator(_national_law)]


_M = TypeVar("_M", bound=BaseModel)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Party(_Model):
    """A controller or joint controller (GDPR Art. 26, Art. 30(1)(a))."""

    name: Text
    contact_email: Email
    country: Country
    dpo_contact: Text | None = None


# ---- run declaration --------------------------------------------------------


class RunDeclaration(_Model):
    """What a run declares, held by the server (one per run)."""

    run_id: Text | None = None
    purpose: PurposeId
    lawful_basis: GdprBasis | None = None
    legitimate_interests_assessment: Text | None = None
    """Reference to the balancing test, needed when lawful_basis is (f)."""
    special_category_condition: Art9Condition | None = None
    """The Art. 9(2) condition a site relies on when its manifest names none
    (art9_condition); the law behind it is always the site's own (art9_law)."""
    controller: Party
    joint_controllers: tuple[Party, ...] = ()
    server_country: Country
    dp_enabled: StrictBool = True
    epsilon: Annotated[StrictFloat, Field(gt=0.0, allow_inf_nan=False)] | None = None
    """Sample-level epsilon each site spends over the whole run."""
    delta: Delta | None = None
    allow_non_private: StrictBool = False
    """Must be set, and is then reported, to run without differential privacy."""
    model_retention_days: Days
    log_retention_days: Days
    min_sites_per_round: Annotated[StrictInt, Field(ge=1, le=100000)] = 2
    scc_reference: SccReference | None = None
    dpia_id: Text | None = None
    dpia: DpiaRecord | None = None
    registry: PartyRegistry | None = None
    """The parties of the run, their roles and agreements (``[registry]``); required: the
    gate GDPR-26-28 refuses a run without it or with a document missing or expired."""
    """The DPIA the run relies on (``dpia_file`` in the TOML names its file); required,
    approved and current where a site processes special-category data (GDPR-35)."""

    @model_validator(mode="before")
    @classmethod
    def _moved_fields(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "special_category_law" in data:
            raise ValueError(
                "special_category_law: the law behind a site's Art. 9(2) condition belongs to "
                "each site: move it to the site manifests as art9_law = 'XX: <citation>'"
            )
        return data

    @model_validator(mode="after")
    def _dpia_id(self) -> RunDeclaration:
        if self.dpia is not None and self.dpia_id is not None and self.dpia_id != self.dpia.id:
            raise ValueError(
                f"dpia_id: {self.dpia_id!r} is not the id of the DPIA file "
                f"({self.dpia.id!r}): make them agree"
            )
        return self

    @model_validator(mode="after")
    def _dp_parameters(self) -> RunDeclaration:
        if self.dp_enabled and self.epsilon is None:
            raise ValueError("epsilon: is required when dp_enabled is true: add it")
        if self.dp_enabled and self.delta is None:
            raise ValueError("delta: is required when dp_enabled is true: add it")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Canonical JSON-ready form."""
        return self.model_dump(mode="json")

    def sha256(self) -> str:
        """Hash of the canonical JSON form: what a site approves and pins."""
        return hashlib.sha256(canonical_json(self.to_dict())).hexdigest()


# ---- site manifest ----------------------------------------------------------


class SiteManifest(_Model):
    """What one institution declares about itself and its data, held by its node."""

    site_id: SiteId
    """A pseudonymous id: it appears in messages, logs and reports."""
    institution: Text
    country: Country
    role: Role
    data_categories: frozenset[DataCategory]
    data_subjects: frozenset[DataSubject]
    approved_purposes: frozenset[PurposeId]
    lawful_basis: GdprBasis | None = None
    dpdp_ground: DpdpGround | None = None
    retention_days: Days
    """How long records may be used after they were collected."""
    log_retention_days: Days
    """How long the site keeps logs (its GDPR maximum where GDPR applies)."""
    transfer_safeguards: tuple[Safeguard, ...] = ()
    epsilon_max: Annotated[StrictFloat, Field(gt=0.0)]
    """Largest epsilon the site accepts for a run; inf accepts non-private runs."""
    delta: Delta
    """Largest delta the site accepts."""
    law_packs: tuple[LawPack, ...]
    gdpr_child_age: Annotated[StrictInt, Field(ge=13, le=16)] = 16
    restricted_countries: frozenset[Country] = frozenset()
    """Countries notified under DPDP s.16(1); none is notified, so empty by default."""
    min_cohort_size: Annotated[StrictInt, Field(ge=1, le=1000)] = 5
    feature_columns: tuple[Text, ...] = ()
    """The feature columns the site allows a trainer to read (GDPR Art. 5(1)(c))."""
    dpo_contact: Text | None = None
    legal_entity_id: Text | None = None
    """The site's legal entity in the run declaration's party registry (else the registry
    party that lists this site id in its site_ids)."""
    privacy: SitePrivacyPolicy | None = None
    """The site's own privacy policy (``[privacy]`` table), enforced at the site every round.
    Absent: a deployed site uses ``SitePrivacyPolicy()``'s cautious defaults, a simulated
    site a policy built from its run config when it is set up (fedmeta.site)."""

    # the national law behind the site's processing (GDPR), each "XX: <citation>"
    art6_3_law: NationalLaw | None = None
    """The Union or Member State law that lays down a basis of Art. 6(1)(c) or (e)
    (Art. 6(3)); required for those bases."""
    art9_condition: Art9Condition | None = None
    """The site's own Art. 9(2) condition for its special-category data; if unset,
    the run's special_category_condition."""
    art9_law: NationalLaw | None = None
    """The Union or Member State law behind Art. 9(2)(g)-(j); must apply in the site's
    country (or be Union law)."""
    art9_3_secrecy: Text | None = None
    """For Art. 9(2)(h): the obligation of professional secrecy the staff who process
    the data are under (Art. 9(3))."""
    # minors in research: the site's national law, not GDPR Art. 8
    minor_age: Annotated[StrictInt, Field(ge=1, le=21)] = 18
    """Age under which the site's national law treats a data subject as a minor for this
    processing."""
    minors_law: NationalLaw | None = None
    """The national law on processing minors' data for research that the site follows."""
    minors_need_guardian_consent: StrictBool = True
    """Whether that law needs a parent's or guardian's consent for a minor's record."""
    opt_out_scheme: NationalLaw | None = None
    """The national opt-out scheme the site applies ("XX: <scheme>"), if any; records
    flagged opted_out_at are left out whether or not a scheme is named."""
    collection_dates_recorded: StrictBool = True
    """Whether the site records when each record was collected; if so, a record without
    a collection date is left out (its retention cannot be checked) and counted."""

    @model_validator(mode="after")
    def _packs(self) -> SiteManifest:
        if not self.law_packs:
            raise ValueError("law_packs: must name at least one of gdpr, dpdp")
        if len(set(self.law_packs)) != len(self.law_packs):
            raise ValueError("law_packs: lists a pack twice: remove the repeat")
        if math.isnan(self.epsilon_max):
            raise ValueError("epsilon_max: must be a number")
        return self

    @field_serializer(
        "data_categories", "data_subjects", "approved_purposes", "restricted_countries"
    )
    def _sorted(self, value: frozenset[str]) -> list[str]:
        return sorted(value)

    @property
    def special_categories(self) -> frozenset[str]:
        """The GDPR Art. 9(1) categories among the site's data."""
        return self.data_categories & SPECIAL_CATEGORIES

    @property
    def has_minors(self) -> bool:
        return "minors" in self.data_subjects

    def to_dict(self) -> dict[str, Any]:
        """Canonical JSON-ready form (sets as sorted lists)."""
        return self.model_dump(mode="json")


# ---- loading ----------------------------------------------------------------


def _parse(model: type[_M], data: Any, source: str) -> _M:
    if not isinstance(data, Mapping):
        raise DeclarationError(
            f"{source}: must be a TOML table of fields, got {type(data).__name__}"
        )
    try:
        return model.model_validate(dict(data))
    except ValidationError as exc:
        raise DeclarationError(
            format_validation_error(exc, source, model=model, whole="declaration")
        ) from None


def _read_toml(path: str | Path) -> tuple[dict[str, Any], str]:
    source = str(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f), source
    except FileNotFoundError:
        raise DeclarationError(f"{source}: file not found: check the path") from None
    except IsADirectoryError:
        raise DeclarationError(f"{source}: is a directory, not a TOML file") from None
    except tomllib.TOMLDecodeError as exc:
        raise DeclarationError(
            one_line(f"{source}: not valid TOML: {exc}: fix the syntax", 300)
        ) from None
    except UnicodeDecodeError:
        raise DeclarationError(f"{source}: not valid TOML: the file must be UTF-8 text") from None


def parse_run_declaration(
    data: Mapping[str, Any], source: str = "<run declaration>"
) -> RunDeclaration:
    """A run declaration from already-parsed TOML; DeclarationError names ``source``."""
    return _parse(RunDeclaration, data, source)


def parse_site_manifest(data: Mapping[str, Any], source: str = "<site manifest>") -> SiteManifest:
    """A site manifest from already-parsed TOML; DeclarationError names ``source``."""
    return _parse(SiteManifest, data, source)


def load_run_declaration(path: str | Path) -> RunDeclaration:
    """Read and check a run declaration TOML file (and the DPIA file it names with
    ``dpia_file``, relative to the declaration)."""
    data, source = _read_toml(path)
    if "dpia_file" in data:
        name = data.pop("dpia_file")
        if not isinstance(name, str) or not name:
            raise DeclarationError(f"{source}: field 'dpia_file': must be a file name")
        try:
            data["dpia"] = load_dpia(Path(path).parent / name).to_dict()
        except DpiaError as exc:
            raise DeclarationError(f"{source}: field 'dpia_file': {exc}") from None
    return parse_run_declaration(data, source)


def load_site_manifest(path: str | Path) -> SiteManifest:
    """Read and check a site manifest TOML file."""
    data, source = _read_toml(path)
    return parse_site_manifest(data, source)
