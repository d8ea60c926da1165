"""The run directory's files: config.json, metrics.jsonl, final_model.pt, summary.json."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from fedmeta.durable import append_json_line
from fedmeta.paths import MODEL_FILE


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line and fsync it (a crashed run keeps every finished round)."""
    append_json_line(path, _clean(record))


def save_model(run_dir: Path, state: dict[str, torch.Tensor], **meta: Any) -> Path:
    path = Path(run_dir) / MODEL_FILE
    torch.save({"state_dict": state, **meta}, path)
    return path


def load_model(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / MODEL_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no final model; did the run finish?")
    return torch.load(path, map_location="cpu", weights_only=True)


def write_json(path: Path, data: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(_clean(data), indent=2, sort_keys=True) + "\n")
