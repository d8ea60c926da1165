"""Cost of differential privacy per site round: DP round time / non-private round time.

One "round" is what a site does per federated round: build the model from
theta, wrap it (Opacus), run k optimizer steps on the round's pool. Timed side
by side in one process for the default site model (digits CNN) and a ~1M
parameter Linear model, for every Opacus grad-sample mode that supports the
model, fedmeta's book-keeping clipping (`bk`) and fedmeta's own choice
(`grad-sample-mode = auto`). Per-unit clipping (privacy per patient: a unit's
records sampled together, their summed gradient clipped) is timed beside it on
the same records grouped two per unit, at half the expected batch in units (the
same expected records per step as the per-record rounds).

    python benchmarks/dp_overhead.py [--reps 15]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from doc import machine, write_section  # noqa: E402

from fedmeta.data.tasks import get_task  # noqa: E402
from fedmeta.data.tasks.base import Pool  # noqa: E402
from fedmeta.meta.models import MLP  # noqa: E402
from fedmeta.privacy.dp_training import DPSettings, train_steps  # noqa: E402
from fedmeta.privacy.model_check import check_dp_model  # noqa: E402

MODES = ("hooks", "ew", "functorch", "ghost", "bk")
UNIT_MODES = ("hooks", "bk")
PER_UNIT = 2  # records per unit in the per-unit rounds


def in_units(pool: Pool) -> Pool:
    """The same records, two per privacy unit (e.g. two visits of one patient)."""
    return Pool(pool.x, pool.y, np.arange(len(pool.x)) // PER_UNIT)


def cases():
    task = get_task("digits-fewshot")
    pool = task.episode_pool(task.site_records(0), np.random.default_rng(0))
    yield (
        "digits CNN (default site model)",
        lambda: task.build_model(5),
        pool,
        task.loss_fn(),
        10,
        8,
    )
    rng = np.random.default_rng(0)
    big = Pool(
        rng.normal(size=(4096, 512)).astype(np.float32),
        rng.integers(0, 10, size=4096).astype(np.int64),
    )
    yield (
        "MLP 512-1024-512-10 (1.05M params)",
        lambda: MLP(512, (1024, 512), 10),
        big,
        nn.CrossEntropyLoss(),
        256,
        8,
    )


def time_rounds(build, pool, loss, batch, steps, settings: dict, reps: int):
    """(median round time per setting, failure per setting that cannot run this model).

    Settings are interleaved round by round so that anything else running on the
    machine slows them all alike; the time is this process's CPU time."""
    times: dict[str, list[float]] = {name: [] for name in settings}
    failed: dict[str, str] = {}
    for r in range(reps + 1):
        for name, dp in settings.items():
            if name in failed:
                continue
            torch.manual_seed(r)
            model = build()
            unit = name.endswith("/unit")
            t0 = time.process_time()
            try:
                train_steps(
                    model,
                    in_units(pool) if unit else Pool(pool.x, pool.y),
                    loss_fn=loss,
                    steps=steps,
                    lr=0.05,
                    batch_size=batch // PER_UNIT if unit else batch,
                    dp=dp,
                    seed=r,
                )
            except Exception as exc:  # a mode that does not support the model
                failed[name] = f"n/a ({type(exc).__name__})"
                continue
            if r:  # the first repetition warms up
                times[name].append(time.process_time() - t0)
    return {n: statistics.median(t) for n, t in times.items() if n not in failed}, failed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    lines = [
        "## DP cost per site round (`benchmarks/dp_overhead.py`)",
        "",
        f"Machine: {machine()}; one thread; CPU time of the process (robust to other "
        f"load on the machine), median of {4 * args.reps} (CNN) / {args.reps} "
        "(MLP) rounds, each round = "
        "model built from theta, DP wrapping, k steps with Poisson sampling; all settings "
        "interleaved round by round. bk = fedmeta's book-keeping clipping "
        "(fedmeta/privacy/bookkeeping.py) with Opacus's loader, noise and accountant; "
        "the others are Opacus's grad-sample modes.",
        "",
        "Per unit: the same records two per unit, half the batch in units (same "
        "expected records per step); sampling over units, each unit's summed gradient "
        "clipped (fedmeta/privacy/units.py).",
        "",
        "| model | params | batch, steps | non-private round | "
        + " | ".join(MODES)
        + " | fedmeta auto | "
        + " | ".join(f"{m} per unit" for m in UNIT_MODES)
        + " | auto per unit |",
        "|---" * (6 + len(MODES) + len(UNIT_MODES)) + "|",
    ]
    for name, build, pool, loss, batch, steps in cases():
        n_params = sum(p.numel() for p in build().parameters())
        settings: dict = {"none": None, "auto": DPSettings(1.0, 1.0)}
        settings.update({m: DPSettings(1.0, 1.0, grad_sample_mode=m) for m in MODES})
        settings.update(
            {f"{m}/unit": DPSettings(1.0, 1.0, grad_sample_mode=m) for m in (*UNIT_MODES, "auto")}
        )
        # a CNN round takes milliseconds: measure it 4x as often (the MLP's slow modes
        # take minutes and set the run's length)
        reps = 4 * args.reps if n_params < 100_000 else args.reps
        t, failed = time_rounds(build, pool, loss, batch, steps, settings, reps)
        base = t["none"]
        cells = [f"{t[m] / base:.2f}x" if m in t else failed[m] for m in MODES]
        auto = check_dp_model(build(), loss, "auto", torch.from_numpy(pool.x[:1]))
        units = [
            f"{t[m + '/unit'] / base:.2f}x" if m + "/unit" in t else failed[m + "/unit"]
            for m in (*UNIT_MODES, "auto")
        ]
        lines.append(
            f"| {name} | {n_params:,} | {batch}, {steps} | {1000 * base:.1f} ms | "
            + " | ".join(cells)
            + f" | {t['auto'] / base:.2f}x ({auto}) | "
            + " | ".join(units)
            + " |"
        )
        print(lines[-1], flush=True)
    lines += [
        "",
        "Ratios are DP round time / non-private round time, measured side by side in "
        "one run. Target: <= 2x, never worse than Opacus's best mode. Measured on a "
        "2-core machine that may run other jobs: compare the columns of one row; `bk` "
        "and `fedmeta auto (bk)` run the same code, so their difference shows the "
        "noise.",
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("dp-overhead", body)


if __name__ == "__main__":
    main()
