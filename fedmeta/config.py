"""Run configuration: one flat, validated pydantic model.

The same keys appear in three places, spelled with dashes: the
``[tool.flwr.app.config]`` table of ``pyproject.toml`` (so ``flwr run .`` works),
the ``ConfigRecord`` the server sends to sites each round, and ``config.json``
in a run directory. ``fedmeta simulate`` options map onto the same fields.
"""

from __future__ import annotations

import json
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from policies.validation import Country, format_validation_error

BACKENDS = ("ray", "inline")
"""How ``fedmeta simulate`` runs the sites: Flower's Ray simulation engine, or in-process."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message is one line naming the key."""


def _dash(name: str) -> str:
    return name.replace("_", "-")


class RunConfig(BaseModel):
    """Everything that determines a run (with the seed, it fixes the run's metrics)."""

    model_config = ConfigDict(
        alias_generator=_dash, populate_by_name=True, extra="forbid", frozen=True
    )

    # what and how
    task: str = Field(
        "digits-fewshot",
        description="bundled task name, an installed plug-in "
        "(entry point group fedmeta.tasks) or package.module:Class",
    )
    strategy: Literal["reptile", "fedavg", "fomaml"] = Field(
        "reptile",
        description="server strategy: reptile or fomaml (meta-learning; fomaml "
        "non-private only) or fedavg (the transfer-learning baseline)",
    )
    sites: int = Field(10, ge=1, le=1000, description="training sites (simulated nodes)")
    rounds: int = Field(30, ge=1, le=100_000, description="federated rounds")
    seed: int = Field(
        1, ge=0, description="seed of site sampling, data splits and (simulated sites) DP noise"
    )
    out_dir: str = Field("runs/demo", description="run directory ({run} is replaced by the run id)")
    model: str = Field(
        "",
        description="package.module:factory building the model for any "
        "task ('' = the task's own model); called as factory(out_dim, task)",
    )
    data_dir: str = Field(
        "",
        description="simulation: a folder with one data folder per "
        "site (site-0, site-1, ...; '' = each site's own directory); "
        "folders beyond the training sites are held out for evaluation",
    )

    # tabular-csv only: the shape the federation agreed on (sites hold data.csv + schema.toml)
    features: int = Field(0, ge=0, le=100_000, description="feature columns (tabular-csv)")
    classes: int = Field(2, ge=2, le=10_000, description="classes (tabular-csv, image-sites)")
    # image-sites only: every site's images are converted and resized to this input
    image_size: int = Field(28, ge=4, le=1024, description="side of the square model input")
    channels: Literal[1, 3] = Field(1, description="1 (grayscale) or 3 (RGB)")

    # sampling of sites per round
    fraction_train: float = Field(
        0.5, gt=0.0, le=1.0, description="share of sites sampled each round"
    )
    min_sites: int = Field(2, ge=1, description="minimum sites per round (else the run stops)")
    node_wait_s: float = Field(60.0, gt=0.0, description="bound on waiting for nodes to connect")
    round_timeout_s: float = Field(600.0, gt=0.0, description="seconds a round waits for replies")
    max_failed_rounds: int = Field(
        3,
        ge=1,
        description="stop the run after this many consecutive rounds without a usable reply",
    )
    checkpoint_every: int = Field(
        5,
        ge=0,
        description="checkpoint theta and the strategy "
        "state every N rounds (0 = only when the run stops)",
    )
    max_update_norm: float = Field(100.0, gt=0.0, description="L2 bound on phi - theta")

    # inner loop at each site
    n_way: int = Field(5, ge=2, le=40, description="classes per few-shot episode")
    pool_per_class: int = Field(
        40,
        ge=2,
        description="points per sinusoid (sine); a digits episode uses every record of its classes",
    )
    inner_steps: int = Field(8, ge=1, le=10_000, description="SGD steps a site takes per round")
    inner_lr: float = Field(0.0, ge=0.0, description="0 = the task's default")
    batch_size: int = Field(10, ge=1, description="expected Poisson batch size")

    # Reptile meta-step at the server: beta anneals linearly from meta_lr to meta_lr_final
    meta_lr: float = Field(1.0, gt=0.0, le=2.0, description="server meta step size at round 1")
    meta_lr_final: float = Field(
        0.25, ge=0.0, le=2.0, description="server meta step size at the last round (linear anneal)"
    )

    # differential privacy at each site (sample-level)
    dp: bool = Field(
        True, description="sites train with DP-SGD (false: non-private, declared as such)"
    )
    noise_multiplier: float = Field(1.0, ge=0.0, description="sigma; ignored if target-epsilon > 0")
    target_epsilon: float = Field(0.0, ge=0.0, description="> 0: pick sigma for this epsilon")
    max_grad_norm: float = Field(1.0, gt=0.0, description="clipping bound C per privacy unit")
    delta: float = Field(1e-5, gt=0.0, lt=1.0, description="DP delta")
    accountant: Literal["prv", "rdp", "gdp"] = Field(
        "prv",
        description="asked of the sites; a site accepts only the accountants of its "
        "policy (prv, rdp): gdp is an approximation and is declined",
    )
    epsilon_max: float = Field(10.0, gt=0.0, description="default per-site budget")
    noise_source: Literal["auto", "seeded", "site-csprng"] = Field(
        "auto",
        description="auto: a deployed site (own manifest.toml) always draws DP noise "
        "and sampling from its own CSPRNG; a simulated site uses seeded noise (same seed, "
        "same metrics: for experiments only, no protection against the coordinator); "
        "site-csprng: simulated sites too",
    )
    grad_sample_mode: Literal["auto", "bk", "hooks", "ew", "functorch", "ghost"] = Field(
        "auto", description="per-sample gradient method (auto: book-keeping when the model allows)"
    )

    # meta-evaluation on held-out classes / tasks (server side)
    eval_every: int = Field(5, ge=0, description="0 = only at the end")
    eval_split: Literal["val", "test"] = Field(
        "test",
        description="held-out classes/tasks the server evaluates on each round; "
        "val when the per-round curve chooses training length",
    )
    eval_episodes: int = Field(20, ge=1, description="episodes per server evaluation")
    eval_shots: int = Field(
        5, ge=1, description="labelled examples per class in an evaluation episode"
    )
    eval_query: int = Field(
        15, ge=1, description="query examples per class in an evaluation episode"
    )
    adapt_steps: int = Field(20, ge=0, description="fine-tuning steps on an episode's support set")
    adapt_lr: float = Field(0.0, ge=0.0, description="0 = the task's default")

    device: str = Field("auto", description="auto (cuda if available) | cpu | cuda | cuda:N")

    # policies and evidence
    declaration: str = Field("", description="run declaration TOML ('' = bundled example)")
    site_country: Country = Field(
        "DE", description="ISO 3166 alpha-2 country of simulated sites without a manifest"
    )

    @model_validator(mode="before")
    @classmethod
    def _removed(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and ("secure-rng" in data or "secure_rng" in data):
            raise ValueError(
                "secure-rng was removed: a deployed site always draws its DP "
                "noise from its own CSPRNG (see noise-source); drop the option"
            )
        return data

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.min_sites > self.sites:
            raise ValueError(f"min-sites ({self.min_sites}) exceeds sites ({self.sites})")
        if self.dp and self.noise_multiplier <= 0 and self.target_epsilon <= 0:
            raise ValueError("dp needs noise-multiplier > 0 or target-epsilon > 0")
        if self.dp and self.strategy == "fomaml":
            raise ValueError(
                "strategy fomaml is non-private only (its held-out gradient is "
                "not privatised yet); run it with --no-dp or use reptile"
            )
        return self

    # ---- conversions -----------------------------------------------------
    def to_flat(self) -> dict[str, Any]:
        """Dash-keyed flat dict (Flower run config / ConfigRecord / config.json)."""
        return self.model_dump(by_alias=True)

    @classmethod
    def from_flat(cls, values: Mapping[str, Any], source: str = "config") -> RunConfig:
        """Build from dash- or underscore-keyed values; one-line ConfigError on failure."""
        clean = {str(k).replace("_", "-"): v for k, v in values.items()}
        try:
            return cls.model_validate(clean)
        except ValidationError as exc:
            raise ConfigError(
                format_validation_error(exc, source, model=cls, noun="option", whole="(config)")
            ) from None

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_flat(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: Path) -> RunConfig:
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read run config ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: run config must be a JSON object")
        return cls.from_flat(data, source=str(path))


def choices(key: str) -> tuple[str, ...]:
    """The values a Literal-typed key allows (``strategy``, ``accountant`` ...): the one
    list the validator, ``fedmeta config`` and the command line's choices share."""
    info = RunConfig.model_fields[key.replace("-", "_")]
    if typing.get_origin(info.annotation) is not Literal:
        raise KeyError(f"{key!r} is not a key with a fixed set of values")
    return tuple(str(a) for a in typing.get_args(info.annotation))


def default(key: str) -> Any:
    """The default of a run-configuration key (dash- or underscore-spelled)."""
    return RunConfig.model_fields[key.replace("-", "_")].get_default(call_default_factory=True)


def sites_per_round(known_sites: int, fraction: float, min_sites: int) -> int:
    """How many sites the server samples a round: the one rule the server samples by
    and a site plans its privacy budget with."""
    return max(min_sites, int(round(known_sites * fraction)))


def resolve_device(name: str = "auto") -> str:
    """'auto' -> 'cuda' when a GPU is usable, else 'cpu'; other values pass through."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"option 'device': {name!r} requested but CUDA is not available")
    return name


def build_task(cfg: RunConfig):  # -> fedmeta.data.tasks.Task (import kept lazy: torch)
    """The run's task object, with the run's N-way and pool size."""
    from fedmeta.data.tasks import get_task

    return get_task(
        cfg.task,
        n_way=cfg.n_way,
        pool_per_class=cfg.pool_per_class,
        num_sites=cfg.sites,
        num_features=cfg.features,
        num_classes=cfg.classes,
        model=cfg.model,
        data_dir=cfg.data_dir,
        image_size=cfg.image_size,
        channels=cfg.channels,
    )


def inner_lr(cfg: RunConfig, task) -> float:
    return cfg.inner_lr or task.default_inner_lr


def adapt_lr(cfg: RunConfig, task) -> float:
    return cfg.adapt_lr or task.default_adapt_lr


def run_declaration(cfg: RunConfig):  # -> policies.RunDeclaration
    """The run's declaration, stating what this run really does about DP.

    ``--no-dp`` is an explicit request: the declaration then says no DP and
    allow_non_private, so sites (policy PRIV-DP) and the report see it. A run
    config that would spend more than the declaration promises is refused.
    """
    from policies import example_run_declaration, load_run_declaration

    declared = (
        load_run_declaration(Path(cfg.declaration))
        if cfg.declaration
        else example_run_declaration()
    )
    if not cfg.dp:
        return declared.model_copy(update={"dp_enabled": False, "allow_non_private": True})
    if not declared.dp_enabled:
        raise ConfigError(
            "option 'dp': the run declaration offers no DP; run with --no-dp "
            "or declare dp_enabled = true"
        )
    if declared.epsilon is not None and cfg.target_epsilon > declared.epsilon:
        raise ConfigError(
            f"option 'target-epsilon': {cfg.target_epsilon:g} exceeds the "
            f"declared epsilon {declared.epsilon:g}"
        )
    return declared
