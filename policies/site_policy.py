"""A site's own privacy policy: the limits no round from the coordinator may pass.

The ``[privacy]`` table of a site's ``manifest.toml`` (with the manifest's
``epsilon_max`` and ``delta``) says what the site will do, whatever the
coordinator asks: whether DP is required, how much epsilon it spends per round,
per run and in total, which accountants it trusts, the least noise, the largest
clipping norm, the most inner steps, the largest batch and Poisson rate. Each
round's request is checked against it *before* anything is charged or trained
(:func:`check_round`); a refusal names the setting, as rule id
``SITE-POLICY.<setting>``. The coordinator may ask for more privacy, never less.

``gdp`` is not an allowed accountant: Opacus's GDP accountant is an asymptotic
approximation, not an upper bound on epsilon, so it never decides a budget.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    field_validator,
)

BudgetAccountant = Literal["prv", "rdp"]
"""Accountants whose epsilon is an upper bound (Opacus's PRV and RDP)."""

PositiveFloat = Annotated[StrictFloat | StrictInt, Field(gt=0.0, allow_inf_nan=False)]
NonNegativeFloat = Annotated[StrictFloat | StrictInt, Field(ge=0.0, allow_inf_nan=False)]


class SitePrivacyPolicy(BaseModel):
    """The ``[privacy]`` table of a site manifest (defaults: a cautious hospital)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dp_required: StrictBool = True
    """Every round must train with DP-SGD; a round with dp = false is declined."""
    run_epsilon_max: PositiveFloat | None = None
    """Largest epsilon spent in one run (None: the run's declared epsilon and epsilon_max)."""
    round_epsilon_max: PositiveFloat | None = None
    """Largest epsilon one round may add (None: no per-round limit)."""
    accountants: tuple[BudgetAccountant, ...] = ("prv", "rdp")
    """Accountants the site accepts for its ledger (a ledger keeps the one it began with)."""
    min_noise_multiplier: NonNegativeFloat = 0.5
    """Smallest noise multiplier sigma a round may use."""
    max_grad_norm: PositiveFloat = 10.0
    """Largest per-sample clipping norm C."""
    max_inner_steps: Annotated[StrictInt, Field(ge=1, le=100_000)] = 100
    """Most DP-SGD steps in one round."""
    max_batch_size: Annotated[StrictInt, Field(ge=1, le=1_000_000)] = 256
    """Largest expected (Poisson) batch size."""
    max_sample_rate: Annotated[StrictFloat | StrictInt, Field(gt=0.0, le=1.0)] = 0.5
    """Largest Poisson sampling rate q of a record in one step."""

    @field_validator("accountants", mode="before")
    @classmethod
    def _no_gdp(cls, value: object) -> object:
        if isinstance(value, list | tuple) and "gdp" in value:
            raise ValueError(
                "gdp is an approximation, not an upper bound on epsilon: use prv or rdp"
            )
        if isinstance(value, list | tuple) and not value:
            raise ValueError("name at least one of prv, rdp")
        return value

    def sha256(self, epsilon_max: float, delta: float) -> str:
        """Hash of the effective policy (this table plus the manifest's budget and delta)."""
        return hashlib.sha256(canonical_json(self.effective(epsilon_max, delta))).hexdigest()

    def effective(self, epsilon_max: float, delta: float) -> dict[str, object]:
        doc: dict[str, object] = self.model_dump(mode="json")
        doc["epsilon_max"] = epsilon_max if math.isfinite(epsilon_max) else "inf"
        doc["delta"] = delta
        return doc


def canonical_json(obj: object) -> bytes:
    """Sorted, compact JSON bytes: what fedmeta hashes (an infinite budget as "inf")."""
    return json.dumps(_finite(obj), sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _finite(obj: object) -> object:
    if isinstance(obj, float) and not math.isfinite(obj):
        return "inf" if obj > 0 else "-inf" if obj < 0 else "nan"
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


@dataclass(frozen=True)
class RoundRequest:
    """What the coordinator asks one round to do (from its round config)."""

    dp: bool
    noise_multiplier: float | None  # None: not known yet (planned from a target epsilon)
    max_grad_norm: float
    inner_steps: int
    batch_size: int
    sample_rate: float | None  # None: not known yet (needs the round's pool)
    accountant: str
    delta: float


@dataclass(frozen=True)
class Refusal:
    """The setting a round breaks and why; rule id ``SITE-POLICY.<setting>``."""

    setting: str
    reason: str

    @property
    def rule_id(self) -> str:
        return f"SITE-POLICY.{self.setting}"


def check_round(policy: SitePrivacyPolicy, req: RoundRequest, delta: float) -> Refusal | None:
    """The first setting of ``policy`` the request breaks, or None (checked before any charge).

    ``delta`` is the site's (the manifest's); the request may only ask for a smaller one.
    """
    if not req.dp:
        if policy.dp_required:
            return Refusal(
                "dp_required",
                "the round asks to train without differential "
                "privacy; this site requires DP (privacy.dp_required = true)",
            )
        return None
    if req.accountant not in policy.accountants:
        why = " (gdp is an approximation, never a budget)" if req.accountant == "gdp" else ""
        return Refusal(
            "accountants",
            f"the round asks for the {req.accountant!r} accountant"
            f"{why}; this site accepts {', '.join(policy.accountants)} "
            "(privacy.accountants)",
        )
    if req.delta > delta:
        return Refusal(
            "delta",
            f"the round asks for delta {req.delta:g}; this site accepts at most {delta:g} (delta)",
        )
    if req.noise_multiplier is not None and req.noise_multiplier < policy.min_noise_multiplier:
        return Refusal(
            "min_noise_multiplier",
            f"noise multiplier {req.noise_multiplier:g} is "
            f"below this site's minimum {policy.min_noise_multiplier:g} "
            "(privacy.min_noise_multiplier)",
        )
    if req.max_grad_norm > policy.max_grad_norm:
        return Refusal(
            "max_grad_norm",
            f"clipping norm {req.max_grad_norm:g} exceeds this "
            f"site's maximum {policy.max_grad_norm:g} (privacy.max_grad_norm)",
        )
    if req.inner_steps > policy.max_inner_steps:
        return Refusal(
            "max_inner_steps",
            f"{req.inner_steps} inner steps exceed this site's "
            f"maximum {policy.max_inner_steps} (privacy.max_inner_steps)",
        )
    if req.batch_size > policy.max_batch_size:
        return Refusal(
            "max_batch_size",
            f"batch size {req.batch_size} exceeds this site's "
            f"maximum {policy.max_batch_size} (privacy.max_batch_size)",
        )
    if req.sample_rate is not None and req.sample_rate > policy.max_sample_rate:
        return Refusal(
            "max_sample_rate",
            f"sampling rate {req.sample_rate:g} exceeds this "
            f"site's maximum {policy.max_sample_rate:g} (privacy.max_sample_rate)",
        )
    return None
