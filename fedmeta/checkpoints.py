"""Server checkpoints: theta and the strategy's state after a round, for ``--resume``.

``checkpoints/round-NNNNNN.pt`` holds the run id, the round, theta (a
state dict) and the strategy's state (its round logs, the server's audit
head, the failure watch, any server momentum). The server signs each file's
SHA-256 in its audit log (``model.checkpoint``) *after* the file is durably
on disk; a resumed run loads only a checkpoint whose hash the verified log
holds, so a replaced or edited checkpoint is refused. The last ``KEEP``
files are kept (the log keeps every hash).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedmeta.paths import CHECKPOINT_DIR

CHECKPOINT_ACTION = "model.checkpoint"
RESUME_ACTION = "run.resume"
KEEP = 3
_NAME = re.compile(r"^round-(\d{6,})\.pt$")


class CheckpointError(ValueError):
    """A run cannot be resumed from its checkpoints (one line, names the file)."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    run: str
    round: int
    theta: dict[str, torch.Tensor]
    strategy: dict[str, Any]


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save_checkpoint(
    run_dir: Path,
    run: str,
    server_round: int,
    theta: dict[str, torch.Tensor],
    strategy: dict[str, Any],
) -> tuple[Path, str]:
    """Write the checkpoint of ``server_round`` durably (temp file, fsync, rename); return
    its path and SHA-256. Older checkpoints beyond the last ``KEEP`` are removed."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"round-{server_round:06d}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "format": 1,
            "run": run,
            "round": server_round,
            "theta": {k: v.detach().cpu() for k, v in theta.items()},
            "strategy": strategy,
        },
        tmp,
    )
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    for old in sorted(checkpoint_files(run_dir))[:-KEEP]:
        old.unlink(missing_ok=True)
    return path, file_sha256(path)


def checkpoint_files(run_dir: Path) -> list[Path]:
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name))


def load_checkpoint(path: Path, signed_sha256: str | None) -> Checkpoint:
    """Load ``path`` after checking it against the hash signed in the server's log."""
    path = Path(path)
    if signed_sha256 is None:
        raise CheckpointError(
            f"{path}: no signed model.checkpoint entry in the server's audit "
            "log names this file; it cannot be trusted for a resume"
        )
    got = file_sha256(path)
    if got != signed_sha256:
        raise CheckpointError(
            f"{path}: hashes to {got[:16]}..., the server signed "
            f"{signed_sha256[:16]}...; the checkpoint was changed"
        )
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one line
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(exc).__name__})") from None
    return Checkpoint(
        path, str(data["run"]), int(data["round"]), dict(data["theta"]), dict(data["strategy"])
    )
