"""Apply an adapted model to unlabelled records: one row per record, a probability per class.

The data is read exactly as at adaptation (the preprocessing saved in the adapted
model: image size and channels, or the CSV's feature columns and the
standardisation fitted at the site); no label column or class folder is needed.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedmeta.config import RunConfig, build_task
from fedmeta.data.loaders import load_data, read_features
from fedmeta.data.records import Records
from fedmeta.newsite.adapting import ADAPTED_FORMAT


class AdaptedModelError(ValueError):
    """Not an adapted model file (one line, names the file)."""


@dataclass(frozen=True)
class Predictions:
    """Per record: class probabilities (a classifier), or ``values`` (a regression model;
    ``classes`` empty, ``probabilities`` with no columns)."""

    record_ids: tuple[str, ...]
    classes: tuple[str, ...]
    probabilities: np.ndarray  # [records, classes]
    path: Path | None = None
    values: np.ndarray | None = None  # [records], regression only

    @property
    def labels(self) -> list[str]:
        if self.values is not None:
            return [f"{v:.6g}" for v in self.values]
        return [self.classes[i] for i in self.probabilities.argmax(1)]


def load_adapted(path: Path | str) -> dict[str, Any]:
    path = Path(path)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise AdaptedModelError(
            f"{path}: no such file; give the file `fedmeta adapt` wrote"
        ) from None
    except Exception as exc:
        raise AdaptedModelError(f"{path}: not an adapted model ({type(exc).__name__})") from None
    if not isinstance(saved, dict) or saved.get("format") != ADAPTED_FORMAT:
        raise AdaptedModelError(
            f"{path}: not an adapted model (write one with `fedmeta "
            "adapt`; a run's final_model.pt must be adapted first)"
        )
    return saved


def unlabelled_records(
    saved: dict[str, Any], data: Path | str, split: str = "test"
) -> tuple[Records, Any]:
    cfg = RunConfig.from_flat(saved["config"], source="adapted model")
    task = build_task(cfg)
    prep = saved["preprocessing"]
    if prep.get("loader") == "csv":
        return read_features(Path(data), prep), task
    shape = tuple(prep.get("shape") or task.input_shape())
    return load_data(Path(data), shape, labelled=False, split=split).records, task


def predict_records(
    adapted: Path | str, data: Path | str, *, out: Path | str | None = None, split: str = "test"
) -> Predictions:
    """Class probabilities of every record at ``data`` (written as CSV to ``out``)."""
    saved = load_adapted(adapted)
    records, task = unlabelled_records(saved, data, split)
    if saved.get("kind") == "regression":
        return predict_values(saved, adapted, records, task, out)
    classes = tuple(saved["classes"]) or tuple(
        str(i) for i in range(saved["state_dict"]["head.weight"].shape[0])
    )
    net = task.build_model(len(classes))
    try:
        net.load_state_dict(saved["state_dict"])
    except RuntimeError as exc:
        raise AdaptedModelError(
            f"{adapted}: weights do not fit the task's model ({str(exc).splitlines()[0]})"
        ) from None
    net.eval()
    with torch.no_grad():
        probs = torch.softmax(net(torch.from_numpy(records.x)), dim=1).numpy()
    result = Predictions(tuple(str(r) for r in records.record_ids), classes, probs)
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["record_id", "prediction", *[f"p_{c}" for c in classes]])
            for rid, label, row in zip(result.record_ids, result.labels, probs, strict=True):
                w.writerow([rid, label, *[f"{p:.6f}" for p in row]])
        result = Predictions(result.record_ids, classes, probs, path)
    return result


def predict_values(
    saved: dict[str, Any], adapted: Path | str, records: Records, task: Any, out: Path | str | None
) -> Predictions:
    """A regression model's predicted value of every record (``record_id,prediction``)."""
    net = task.build_model(int(saved["state_dict"]["head.weight"].shape[0]))
    try:
        net.load_state_dict(saved["state_dict"])
    except RuntimeError as exc:
        raise AdaptedModelError(
            f"{adapted}: weights do not fit the task's model ({str(exc).splitlines()[0]})"
        ) from None
    net.eval()
    with torch.no_grad():
        values = net(torch.from_numpy(records.x)).reshape(len(records), -1)[:, 0].numpy()
    result = Predictions(
        tuple(str(r) for r in records.record_ids),
        (),
        np.empty((len(values), 0), np.float32),
        None,
        values,
    )
    if out is None:
        return result
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["record_id", "prediction"])
        for rid, v in zip(result.record_ids, values, strict=True):
            w.writerow([rid, f"{float(v):.6g}"])
    return Predictions(result.record_ids, (), result.probabilities, path, values)
