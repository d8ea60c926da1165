"""fedmeta's Python API: run, evaluate and report a federation from Python.

    import fedmeta

    result = fedmeta.simulate({"task": "sine", "rounds": 5, "sites": 3},
                              out_dir="runs/sine", backend="inline",
                              on_round=lambda m: print(m.round, m.used))
    result.final_model        # theta as a state dict (None if nothing was trained)
    result.epsilon            # site -> epsilon spent (its ledger, all runs)
    fedmeta.evaluate(result.run_dir)
    fedmeta.report(result.run_dir, format="html")

docs/api.md documents every name. A failed run raises :class:`RunFailed`
(holding the :class:`RunResult`) unless ``check=False``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from fedmeta.config import RunConfig
from fedmeta.failures import failure_text
from fedmeta.paths import METRICS_FILE, MODEL_FILE, SUMMARY_FILE
from fedmeta.rounds import EvalMetrics, RoundCallback, RoundMetrics

Status = Literal["completed", "failed"]


@dataclass(frozen=True)
class Failure:
    """Why a run failed: the reason it stopped, and each site's last one-line problem."""

    reason: str
    sites: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RunResult:
    """What :func:`simulate` returns: the run's outcome, per-round metrics and model."""

    run_id: str
    run_dir: Path
    status: Status
    failure: Failure | None
    rounds: list[RoundMetrics]
    """One entry per metrics line of this run, round 0 (the initial model) first."""
    epsilon: dict[str, float]
    """Each DP site's total epsilon after the run (its ledger over every run it joined)."""
    final_model: dict[str, torch.Tensor] | None
    """theta after the last aggregated round; None when no round was aggregated."""
    model_sha256: str | None
    eval: EvalMetrics | None
    """The last server-side meta-evaluation (None if the task has none)."""
    aggregated_rounds: int
    summary: dict[str, Any] = field(repr=False)
    """``summary.json`` as written."""

    @property
    def ok(self) -> bool:
        return self.status == "completed"

    @property
    def trained(self) -> bool:
        return self.final_model is not None

    def raise_for_status(self) -> RunResult:
        """Raise :class:`RunFailed` if the run failed; else return self."""
        if not self.ok:
            raise RunFailed(self)
        return self

    @classmethod
    def from_run_dir(cls, run_dir: str | Path) -> RunResult:
        """Read a finished (or failed) run's directory."""
        run_dir = Path(run_dir)
        path = run_dir / SUMMARY_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no summary; did the run finish?")
        summary = json.loads(path.read_text())
        run_id = str(summary.get("run", ""))
        lines = []
        metrics = run_dir / METRICS_FILE
        if metrics.is_file():
            for text in metrics.read_text().splitlines():
                rec = json.loads(text)
                if rec.get("run") == run_id:
                    lines.append(RoundMetrics.from_line(rec))
        model = None
        if summary.get("trained", True) and (run_dir / MODEL_FILE).is_file():
            saved = torch.load(run_dir / MODEL_FILE, map_location="cpu", weights_only=True)
            model = dict(saved["state_dict"])
        fail = summary.get("failure")
        ev = summary.get("eval")
        return cls(
            run_id=run_id,
            run_dir=run_dir,
            status="failed" if summary.get("status") == "failed" else "completed",
            failure=Failure(str(fail.get("reason", "")), dict(fail.get("sites") or {}))
            if isinstance(fail, dict)
            else None,
            rounds=lines,
            epsilon={
                str(k): float(v)
                for k, v in (summary.get("epsilon") or {}).items()
                if isinstance(v, int | float)
            },
            final_model=model,
            model_sha256=summary.get("model_sha256"),
            eval=EvalMetrics.from_dict(ev) if isinstance(ev, dict) and ev else None,
            aggregated_rounds=int(summary.get("aggregated_rounds") or 0),
            summary=summary,
        )


class RunFailed(RuntimeError):
    """The run stopped without completing (no usable replies, every site lost, declined or
    out of budget, a model no site could train). ``result`` holds what it did."""

    def __init__(self, result: RunResult) -> None:
        super().__init__(failure_text(result.summary))
        self.result = result


def _config(config: RunConfig | Mapping[str, Any] | None, settings: Mapping[str, Any]) -> RunConfig:
    if isinstance(config, RunConfig):
        if not settings:
            return config
        return RunConfig.from_flat({**config.to_flat(), **settings}, source="simulate()")
    return RunConfig.from_flat({**dict(config or {}), **settings}, source="simulate()")


def simulate(
    config: RunConfig | Mapping[str, Any] | None = None,
    *,
    on_round: RoundCallback | None = None,
    backend: str = "ray",
    overwrite: bool = False,
    resume: str | Path | None = None,
    check: bool = True,
    **settings: Any,
) -> RunResult:
    """Run a whole federation on this machine and return its :class:`RunResult`.

    ``config``: a :class:`RunConfig`, or a mapping of config keys (``"inner-steps"`` or
    ``"inner_steps"``); ``settings`` override single keys (``out_dir="runs/x"``).
    ``on_round(metrics)`` is called after every round (and round 0) with a
    :class:`RoundMetrics`; an exception it raises stops the run (resumable).
    ``backend``: ``"ray"`` (Flower's simulation engine) or ``"inline"`` (every site in
    this process; fast, same metrics). ``overwrite``: reuse a run directory (site
    ledgers are kept). ``resume``: a run directory whose stopped run continues from its
    last checkpoint (``config`` and ``settings`` must then be left out).
    A failed run raises :class:`RunFailed` unless ``check=False``. Bad config values raise
    ``fedmeta.config.ConfigError`` (one line naming the key).
    """
    from fedmeta.simulation import load_run_config
    from fedmeta.simulation import simulate as run

    if resume is not None:
        if config is not None or settings:
            raise ValueError(
                "simulate(resume=...): the run continues with its own config; "
                "pass no config or settings"
            )
        cfg = load_run_config(Path(resume))
    else:
        cfg = _config(config, settings)
    summary = run(
        cfg, overwrite=overwrite, backend=backend, resume=resume is not None, on_round=on_round
    )
    result = RunResult.from_run_dir(Path(cfg.out_dir))
    if summary.get("run") != result.run_id:  # pragma: no cover - same file just written
        raise RuntimeError(f"{cfg.out_dir}: summary changed while reading it")
    return result.raise_for_status() if check else result


def evaluate(
    run_dir: str | Path,
    *,
    episodes: int | None = None,
    shots: int | None = None,
    steps: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    split: Literal["val", "test"] = "test",
) -> EvalMetrics:
    """Meta-evaluate a run's final model on held-out episodes of its task: adapt on
    ``shots`` labelled examples per class with ``steps`` SGD steps, score on the query
    set. Defaults are the run's own evaluation settings."""
    from fedmeta.config import adapt_lr, build_task
    from fedmeta.meta.adaptation import meta_evaluate
    from fedmeta.metrics import load_model
    from fedmeta.paths import CONFIG_FILE

    run_dir = Path(run_dir)
    cfg = RunConfig.load(run_dir / CONFIG_FILE)
    saved = load_model(run_dir)
    task = build_task(cfg)
    if not task.server_eval:
        raise ValueError(f"{run_dir}: task {cfg.task} has no held-out episodes to evaluate on")
    shots_ = shots or cfg.eval_shots
    res = meta_evaluate(
        task,
        saved["state_dict"],
        int(saved["out_dim"]),
        split=split,
        episodes=episodes or cfg.eval_episodes,
        shots=shots_,
        query=cfg.eval_query,
        steps=cfg.adapt_steps if steps is None else steps,
        lr=lr or adapt_lr(cfg, task),
        seed=seed,
    )
    return EvalMetrics.from_dict(
        {
            "metric": res.metric,
            "adapted": res.adapted,
            "adapted_ci95": res.adapted_ci95,
            "unadapted": res.unadapted,
            "episodes": res.episodes,
            "shots": shots_,
            "n_way": task.meta_out_dim(),
        }
    )


def report(
    run_dir: str | Path,
    *,
    format: str = "html",
    out: str | Path | None = None,
    site: str | None = None,
    trust: tuple[str, ...] = (),
    allow_unverified: bool = False,
) -> Path:
    """Write the compliance report of a run (``html``, ``json`` or ``md``); return its path.
    Raises ``fedmeta.report.UnverifiedRunError`` when an audit log fails verification
    (unless ``allow_unverified``) and ``fedmeta.report.ReportError`` for a bad option."""
    from fedmeta.report import generate

    path, _ = generate(
        Path(run_dir),
        format,
        out=Path(out) if out else None,
        site=site,
        allow_unverified=allow_unverified,
        trust=trust,
    )
    return path
