"""Learning results: adapted vs un-adapted accuracy per round (and a baseline run's)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedmeta.paths import SHOTS_CURVE
from fedmeta.report.collect import RunFiles, read_baseline
from fedmeta.report.evidence import metrics_signed
from fedmeta.report.model import EvalPoint, LearningSection, RoundRow, ShotsPoint


def eval_points(metrics: list[dict[str, Any]]) -> list[EvalPoint]:
    out = []
    for m in metrics:
        ev = m.get("eval")
        if not isinstance(ev, dict):
            continue
        out.append(
            EvalPoint(
                round=m["round"],
                adapted=ev.get("adapted"),
                adapted_ci95=ev.get("adapted_ci95"),
                unadapted=ev.get("unadapted"),
                episodes=ev.get("episodes"),
                shots=ev.get("shots"),
                n_way=ev.get("n_way"),
            )
        )
    return out


def _status(m: dict[str, Any], site: str) -> str:
    if site in (m.get("used") or []):
        return "used"
    for key in ("declined", "dropped", "lost"):
        if site in (m.get(key) or {}):
            return key
    return "not sampled"


def rounds(files: RunFiles, site: str | None) -> list[RoundRow]:
    out = []
    for m in files.round_lines:
        if site is None:
            out.append(
                RoundRow(
                    round=m["round"],
                    model_sha256=m.get("model_sha256"),
                    beta=m.get("beta"),
                    sampled=len(m.get("sampled") or []),
                    used=len(m.get("used") or []),
                    declined=len(m.get("declined") or {}),
                    dropped=len(m.get("dropped") or {}),
                    lost=len(m.get("lost") or {}),
                )
            )
        else:
            out.append(
                RoundRow(
                    round=m["round"],
                    model_sha256=m.get("model_sha256"),
                    beta=m.get("beta"),
                    site_status=_status(m, site),
                )
            )
    return out


def shots_curve(run_dir: Path) -> list[ShotsPoint]:
    """Every method's accuracy against shots, as ``fedmeta evaluate`` measured it."""
    import json

    path = Path(run_dir) / SHOTS_CURVE
    if not path.is_file():
        return []
    try:
        curve = json.loads(path.read_text())
        return [
            ShotsPoint(
                method=p["method"],
                label=p.get("label") or p["method"],
                shots=p["shots"],
                mean=p["mean"],
                ci95=p["ci95"],
                lr=p.get("lr"),
                episodes=p["episodes"],
                shift=bool(curve.get("shift", False)),
            )
            for p in curve["points"]
        ]
    except (ValueError, KeyError, TypeError):
        return []  # an unreadable curve is left out; the per-round results still stand


def learning_section(files: RunFiles, site: str | None, baseline: Path | None) -> LearningSection:
    points = eval_points(files.metrics)
    base_id = base_strategy = None
    base_points: list[EvalPoint] = []
    if baseline is not None:
        base_id, base_strategy, base_metrics = read_baseline(baseline)
        base_points = eval_points(base_metrics)
    metric = next(
        (m["eval"].get("metric") for m in files.metrics if isinstance(m.get("eval"), dict)), None
    )
    return LearningSection(
        metric=metric,
        task=files.config.task,
        strategy=files.config.strategy,
        points=points,
        baseline_run_id=base_id,
        baseline_strategy=base_strategy,
        baseline_points=base_points,
        rounds=rounds(files, site),
        shots_curve=shots_curve(files.run_dir),
        evidence="signed by the server" if metrics_signed(files) else "unsigned",
    )
