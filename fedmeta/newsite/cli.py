"""``fedmeta adapt`` and ``fedmeta predict``: a new site's two commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedmeta.cli_common import fail as _fail


def _errors() -> tuple[type[BaseException], ...]:
    from fedmeta.config import ConfigError
    from fedmeta.data.loaders import DataError
    from fedmeta.data.tasks.base import TaskError
    from fedmeta.newsite.predicting import AdaptedModelError
    from fedmeta.newsite.provenance import ProvenanceError

    return (
        ConfigError,
        DataError,
        TaskError,
        ProvenanceError,
        AdaptedModelError,
        FileNotFoundError,
    )


def adapt_command(
    model: Annotated[
        Path,
        typer.Argument(
            help="the federation's run directory, or its "
            "final_model.pt (config.json and "
            "audit/server-audit-log.jsonl beside it)"
        ),
    ],
    data: Annotated[
        Path,
        typer.Option(
            help="this site's labelled data: an image folder "
            "(one sub-folder per class), a MedMNIST .npz, or a "
            "folder with data.csv + schema.toml"
        ),
    ],
    out: Annotated[Path, typer.Option(help="where to write the adapted model")],
    shots: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="labelled examples per class to "
            "adapt on (default: all); the rest are "
            "held back and scored",
        ),
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="most fine-tuning steps (default: "
            "the run's adapt-steps); cross-validation on "
            "the support set picks 0, a quarter, half or "
            "all",
        ),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(
            help="fine-tuning rate (default: the run's); a prototype head is tuned at a tenth of it"
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="seed of the support-set draw")] = 0,
    public_key: Annotated[
        Path | None,
        typer.Option(
            help="the coordinator's audit public key "
            "(PEM) to pin; default: the key in the "
            "log (trust on first use)"
        ),
    ] = None,
    audit_log: Annotated[
        Path | None, typer.Option(help="the run's server audit log, if not beside the model")
    ] = None,
) -> None:
    """Adapt the federation's model to this site's labelled examples (any number of classes)."""
    from fedmeta.newsite import adapt

    try:
        res = adapt(
            model,
            data,
            shots=shots,
            out=out,
            steps=steps,
            lr=lr,
            seed=seed,
            public_key=public_key,
            audit_log=audit_log,
        )
    except _errors() as exc:
        raise _fail(str(exc)) from None
    prov = res.provenance
    typer.echo(
        f"model of run {prov['run_id']} (sha256 {prov['final_model_sha256'][:16]}..., "
        f"signed run.end entry #{prov['audit_entry']['seq']}, key "
        f"{prov['audit_key_fingerprint']} {prov['audit_key_source']})"
    )
    if res.choice.head == "own":
        typer.echo(f"adapted (regression) on {res.support} labelled examples")
    else:
        typer.echo(f"adapted to {len(res.classes)} classes on {res.support} labelled examples")
    if res.held_back_mse is not None:
        typer.echo(
            f"mean squared error on the {res.held_back} held-back labelled examples: "
            f"{res.held_back_mse:.4g}"
        )
    if res.held_back_accuracy is not None:
        typer.echo(
            f"accuracy on the {res.held_back} held-back labelled examples: "
            f"{res.held_back_accuracy:.3f}"
        )
    typer.echo(f"wrote {res.path}")


def predict_command(
    adapted: Annotated[Path, typer.Argument(help="the model `fedmeta adapt` wrote")],
    data: Annotated[
        Path,
        typer.Option(
            help="unlabelled records: images (a folder, "
            "sub-folders optional), an .npz, or a CSV with the "
            "feature columns (no label column needed)"
        ),
    ],
    out: Annotated[
        Path, typer.Option(help="predictions CSV: record_id, prediction, p_<class>...")
    ] = Path("predictions.csv"),
    split: Annotated[str, typer.Option(help="npz only: which split's images")] = "test",
) -> None:
    """Predict class probabilities for unlabelled records with an adapted model."""
    from fedmeta.newsite import predict

    try:
        res = predict(adapted, data, out=out, split=split)
    except _errors() as exc:
        raise _fail(str(exc)) from None
    what = f"classes {', '.join(res.classes)}" if res.classes else "predicted values"
    typer.echo(f"{len(res.record_ids)} records, {what}; wrote {res.path}")
