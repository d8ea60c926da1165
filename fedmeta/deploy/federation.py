"""The federation file: who takes part and where the SuperLink is.

A small TOML file the coordinator writes once and keeps under version control::

    name = "example-federation"          # also the name of the `flwr` connection

    [superlink]
    host = "fl.consortium.example.org"   # the address sites and the coordinator dial
    port = 9093                          # the proxy's port (nginx: Fleet API only, mTLS)
    bind = "0.0.0.0"                     # interface the proxy listens on
    local_port = 9091                    # the SuperLink's own port, on 127.0.0.1 only
    sans = ["fl.consortium.example.org", "10.20.0.5"]   # DNS names / IPs in its certificate

    [[sites]]
    id = "site-de-01"                    # pseudonymous site id (appears in logs and reports)
    index = 0                            # bundled-data partition (demos only; optional)
    country = "DE"                       # ISO 3166 alpha-2

Validated with pydantic; anything wrong raises :class:`FederationError` with one
line naming the file and the field, e.g.
``federation.toml: field 'sites[1].country': must be an ISO 3166 alpha-2 ...``.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from policies.validation import Country, SiteId, format_validation_error

DEFAULT_RUNTIME_PORT = 9094  # flower-supernode's own local port (--port)
DEFAULT_LOCAL_PORT = 9091  # the SuperLink's port on the coordinator's loopback
LOOPBACK_NAME = "localhost"  # the name the proxy verifies on the SuperLink's certificate


class FederationError(ValueError):
    """The federation file cannot be used; the message is one line."""


def _name(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]{0,63}", value):
        raise ValueError(
            "must start with a letter and hold at most 64 letters, digits, "
            f"'-' or '_' (got {value!r})"
        )
    return value


def _host(value: str) -> str:
    if is_ip(value):
        return value
    labels = value.rstrip(".").split(".")
    if (
        not value
        or len(value) > 253
        or not all(
            re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", lab) for lab in labels
        )
    ):
        raise ValueError(f"must be a DNS name or an IP address (got {value!r})")
    return value


def is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


Name = Annotated[StrictStr, AfterValidator(_name)]
Host = Annotated[StrictStr, AfterValidator(_host)]
Port = Annotated[StrictInt, Field(ge=1, le=65535)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SuperLinkAddress(_Model):
    """Where the sites reach the federation (the proxy in front of the SuperLink), where the
    proxy listens, the SuperLink's loopback port, and the names its certificate holds."""

    host: Host
    port: Port = 9093
    bind: Host = "0.0.0.0"
    local_port: Port = DEFAULT_LOCAL_PORT
    sans: tuple[Host, ...] = ()

    @model_validator(mode="after")
    def _ports_differ(self) -> SuperLinkAddress:
        if self.local_port == self.port:
            raise ValueError(
                "local_port must differ from port (the "
                "proxy listens on port, the SuperLink on 127.0.0.1:local_port)"
            )
        return self

    @property
    def local_address(self) -> str:
        """The SuperLink's own address: the coordinator's `flwr` and the proxy dial it."""
        return f"127.0.0.1:{self.local_port}"

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def certificate_names(self) -> tuple[str, ...]:
        """SANs of the certificate (used by the proxy and by the SuperLink): the listed ones,
        ``host``, 127.0.0.1 (Flower's SuperExec and the coordinator's ``flwr`` dial the
        SuperLink there) and ``localhost`` (the name the proxy verifies upstream)."""
        names = list(self.sans) + [self.host, "127.0.0.1", LOOPBACK_NAME]
        return tuple(dict.fromkeys(names))


class SiteEntry(_Model):
    """One institution of the federation."""

    id: SiteId
    country: Country
    index: Annotated[StrictInt, Field(ge=0)] | None = None
    """Bundled-data partition the node trains on (demos); None: the site's own data."""
    runtime_port: Port | None = None
    """flower-supernode's local port (``--port``); default 9094 + the site's position."""


class Federation(_Model):
    """The whole federation file."""

    name: Name
    superlink: SuperLinkAddress
    sites: tuple[SiteEntry, ...] = Field(min_length=1)
    ca_validity_days: Annotated[StrictInt, Field(ge=30, le=36500)] = 3650
    server_validity_days: Annotated[StrictInt, Field(ge=7, le=825)] = 397

    @model_validator(mode="after")
    def _unique(self) -> Federation:
        ids = [s.id for s in self.sites]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"sites: site id {dup[0]!r} appears twice")
        return self

    def runtime_port(self, site_id: str) -> int:
        for i, s in enumerate(self.sites):
            if s.id == site_id:
                return s.runtime_port or DEFAULT_RUNTIME_PORT + i
        raise KeyError(site_id)

    def site(self, site_id: str) -> SiteEntry:
        for s in self.sites:
            if s.id == site_id:
                return s
        raise KeyError(site_id)

    def site_index(self, site_id: str) -> int:
        """The ``site-index`` node-config value (bundled-data partition, else position)."""
        site = self.site(site_id)
        return site.index if site.index is not None else self.sites.index(site)


def parse_federation(data: dict, source: str = "<federation>") -> Federation:
    """A Federation from parsed TOML; FederationError (one line) names source and field."""
    try:
        return Federation.model_validate(data)
    except ValidationError as exc:
        raise FederationError(
            format_validation_error(exc, source, model=Federation, whole="federation")
        ) from None


def load_federation(path: Path) -> Federation:
    """Read and validate a federation TOML file."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FederationError(f"{path}: file not found: check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FederationError(f"{path}: cannot read the federation file ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise FederationError(f"{path}: not valid TOML: {exc}: fix the syntax") from None
    return parse_federation(data, str(path))
