"""How much of the sine gap comes from the federated setting? (`benchmarks/sine_gap.py`)

The MAML/Reptile papers meta-train on an unlimited supply of sinusoids with
amplitudes from the full range; a federation of `sine` sites holds a finite
set (10 sinusoids per site, 40 points each) and each site only its own
amplitude band. This script meta-trains Reptile centrally with the sites'
inner loop (8 SGD steps, batch 10, inner lr 0.01) and the server's meta step
(5 tasks per meta step, beta 1.0 -> 0.25), so the only differences are:

* ``centralized, same tasks``: the union of the sites' sinusoids (the federated
  run's exact tasks, no federation),
* ``centralized, unlimited tasks``: a fresh sinusoid from the full range every time,

each for the federated run's number of meta steps and for 10x as many, and
scores them (and the federated runs' models, if given) with the same protocol as
``fedmeta evaluate`` (10 support points, 32 steps, lr chosen on 100 validation
episodes, 400 test episodes). A federated run is one of `fedmeta simulate --task sine
--strategy reptile --sites 10 --no-dp` (5 sites per round, the task's site settings);
its rounds play the part of the meta steps (beta is annealed over the run's rounds, as
over the centralized run's steps), and its server validation curve, if it evaluated
during training, is kept beside its score.

    python benchmarks/sine_gap.py [--meta-steps 300] [--mults 1,10] \
        [--federated RUN_DIR [RUN_DIR ...]] [--out X.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from fedmeta.data.tasks.base import Pool
from fedmeta.data.tasks.sine import AMP, PHASE, Sine, _points
from fedmeta.meta.adaptation import mean_ci95
from fedmeta.meta.curve import choose_lr
from fedmeta.meta.methods import Method, draw_episodes, episode_scores
from fedmeta.meta.reptile import beta_at
from fedmeta.metrics import load_model
from fedmeta.privacy.dp_training import train_steps

SITES, PER_ROUND, INNER_STEPS, INNER_LR, BATCH = 10, 5, 8, 0.01, 10


def meta_train(task: Sine, meta_steps: int, source: str, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model = task.build_model(1)
    fixed = []
    if source == "same":  # the sites' sinusoids, exactly
        for s in range(SITES):
            rec = task.site_records(s)
            fixed += [
                Pool(rec.x[rec.groups == g], rec.y[rec.groups == g]) for g in np.unique(rec.groups)
            ]
    for t in range(1, meta_steps + 1):
        theta = {k: v.clone() for k, v in model.state_dict().items()}
        phis = []
        for _ in range(PER_ROUND):
            if fixed:
                pool = fixed[rng.integers(len(fixed))]
            else:
                x, y = _points(rng, rng.uniform(*AMP), rng.uniform(*PHASE), task.pool_per_class)
                pool = Pool(x, y)
            model.load_state_dict(theta)
            train_steps(
                model,
                pool,
                loss_fn=task.loss_fn(),
                steps=INNER_STEPS,
                lr=INNER_LR,
                batch_size=BATCH,
                dp=None,
                seed=int(rng.integers(2**31)),
            )
            phis.append({k: v.clone() for k, v in model.state_dict().items()})
        beta = beta_at(t, meta_steps, 1.0, 0.25)
        model.load_state_dict(
            {k: theta[k] + beta * (sum(p[k] for p in phis) / len(phis) - theta[k]) for k in theta}
        )
    return model.state_dict()


def score(task: Sine, state, grid, val, test) -> dict:
    method = Method("meta", "meta")
    lr, _, _ = choose_lr(task, method, (state, 1), val, grid, 32, 0)
    mean, ci = mean_ci95(episode_scores(task, method, (state, 1), test, steps=32, lr=lr, seed=0))
    return {"mse": mean, "ci95": ci, "lr": lr}


def federated_row(run: Path, task: Sine, grid, val, test) -> tuple[str, dict]:
    """A federated run's score, its rounds, training time and server validation curve."""
    summary = json.loads((run / "summary.json").read_text())
    if summary.get("task") != "sine" or summary.get("dp"):
        raise SystemExit(
            f"{run}: not a non-private sine run; give a `fedmeta simulate --task sine"
            " --no-dp` run directory"
        )
    row = score(task, load_model(run)["state_dict"], grid, val, test)
    row["rounds"] = summary["rounds"]
    row["train_wall_s"] = summary.get("wall_s")
    curve = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if isinstance(m.get("eval"), dict) and m["eval"].get("metric") == "mse":
            curve.append([m["round"], m["eval"]["adapted"], m["eval"]["adapted_ci95"]])
    if len(curve) > 2:
        config = json.loads((run / "config.json").read_text())
        row["val_curve"] = curve
        row["val_curve_protocol"] = {
            k: config.get(k)
            for k in ("eval-split", "eval-shots", "eval-episodes", "adapt-steps", "adapt-lr")
        }
    return f"federated (sites), {summary['rounds']} rounds", row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--meta-steps", type=int, default=300)
    ap.add_argument("--federated", type=Path, nargs="*", default=[])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/fewshot/sine-gap.json"))
    ap.add_argument("--mults", default="1,10", help="multiples of --meta-steps to train")
    ap.add_argument("--sources", default="same,unlimited", help="task supplies to train on")
    args = ap.parse_args()
    torch.set_num_threads(1)
    task = Sine()
    grid = [0.003, 0.01, 0.03, 0.1]
    val = draw_episodes(task, "val", 100, 10, 15, 10_001)
    test = draw_episodes(task, "test", 400, 10, 15, 10_000)
    out: dict = {"meta_steps": args.meta_steps, "grid": grid, "rule": "one-se", "rows": {}}
    started = time.time()
    for run in args.federated:
        name, row = federated_row(run, task, grid, val, test)
        out["rows"][name] = row
        print(name, {k: v for k, v in row.items() if k != "val_curve"}, flush=True)
    for source in filter(None, args.sources.split(",")):
        for mult in (int(m) for m in args.mults.split(",")):
            steps = args.meta_steps * mult
            t0 = time.time()
            state = meta_train(task, steps, source, seed=1)
            train_s = round(time.time() - t0, 1)
            name = f"centralized, {source} tasks, {steps} meta steps"
            out["rows"][name] = {**score(task, state, grid, val, test), "train_wall_s": train_s}
            print(name, out["rows"][name], flush=True)
    out["wall_s"] = round(time.time() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
