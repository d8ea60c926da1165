"""The new site's payoff: adapt the federation's model to a few labelled examples, then
predict. ``fedmeta.adapt`` and ``fedmeta.predict`` (imports are deferred: ``import
fedmeta`` stays light)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from fedmeta.newsite.adapting import Adapted
    from fedmeta.newsite.predicting import Predictions


def adapt(
    model: Path | str,
    data: Path | str,
    *,
    shots: int | None = None,
    out: Path | str | None = None,
    steps: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    public_key: Path | str | None = None,
    audit_log: Path | str | None = None,
) -> Adapted:
    """Adapt a federation's final model (run directory or ``final_model.pt``) to the
    labelled data at ``data`` (image folder, MedMNIST .npz, or data.csv + schema.toml).

    The model's hash is checked against the run's signed audit log first. The head is
    re-initialised from class prototypes of ``shots`` examples per class (all if None),
    then the whole model is fine-tuned for up to ``steps`` SGD steps (defaults: the
    run's adaptation settings; prototype heads at a tenth of ``lr``), as many as two-fold
    cross-validation on the support set supports. A regression model is fine-tuned on
    ``shots`` records for ``steps`` steps at ``lr`` and predicts values. Writes the
    adapted model (with classes, preprocessing, provenance) to ``out`` when given.
    """
    from fedmeta.newsite.adapting import adapt_model

    return adapt_model(
        model,
        data,
        shots=shots,
        out=out,
        steps=steps,
        lr=lr,
        seed=seed,
        public_key=Path(public_key) if public_key else None,
        audit_log=Path(audit_log) if audit_log else None,
    )


def predict(
    adapted: Path | str, data: Path | str, *, out: Path | str | None = None, split: str = "test"
) -> Predictions:
    """Class probabilities for every record at ``data`` (no labels needed) with an
    adapted model; writes ``record_id, prediction, p_<class>...`` CSV to ``out``."""
    from fedmeta.newsite.predicting import predict_records

    return predict_records(adapted, data, out=out, split=split)


__all__ = ["adapt", "predict"]
