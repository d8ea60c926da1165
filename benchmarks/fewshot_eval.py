"""One slice of the few-shot evaluation (some methods, some shot counts) to a JSON file.

``benchmarks/fewshot_accuracy.py`` runs these slices (in parallel where cores
allow) and assembles the tables; each slice follows ``fedmeta evaluate``'s
protocol (``fedmeta.meta.curve.shots_curve``).

    python benchmarks/fewshot_eval.py RUN_DIR... --shots 1,5 --methods scratch,meta \
        [--shift] [--lr-grid 0.03,0.1,0.3] [--episodes 400] [--val-episodes 100] --out X.json

An existing ``--out`` measured under the current protocol (rate-selection rule
and step schedule) with this grid is left as it is. One measured under an
earlier protocol is measured again: the validation grid is scored again, and a
test cell is taken from the old file only where the schedule, step budget and
test episodes are the same and the chosen rate did not move (it would repeat
exactly); the earlier choices are kept in the file under ``previous``. One of
the current protocol with another grid is extended: only the grid's new rates
are scored on validation (the kept ones are taken from its ``val_grid``, the
same episodes and adaptation), the rule is applied again, and only a cell whose
chosen rate moved is measured again on test; the earlier grid's choices are kept
under ``grid_previous``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fedmeta.meta.curve import LR_RULE, SCHEDULE, shots_curve
from fedmeta.meta.protocol import grid_text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--shots", default="1,5,10")
    ap.add_argument("--methods", default=None, help="comma-separated method names (all)")
    ap.add_argument("--shift", action="store_true")
    ap.add_argument("--lr-grid", default=grid_text())
    ap.add_argument("--episodes", type=int, default=400)
    ap.add_argument("--val-episodes", type=int, default=100)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    grid = [float(x) for x in args.lr_grid.split(",")]
    measured, previous, val_measured, extended = {}, None, {}, None
    if args.out.exists():
        old = json.loads(args.out.read_text())
        protocol = (old.get("lr_rule", "best"), old.get("schedule", "constant"))
        if protocol == (LR_RULE, SCHEDULE) and old["lr_grid"] == grid:
            return
    if args.out.exists() and protocol == (LR_RULE, SCHEDULE):
        same = (old["episodes"], old["val_episodes"], bool(old["shift"])) == (
            args.episodes,
            args.val_episodes,
            args.shift,
        ) and (args.steps is None or old["steps"] == args.steps)
        if not same:
            raise SystemExit(
                f"{args.out}: kept with other episodes, steps or shift than asked; "
                "move it aside to measure it afresh"
            )
        measured = {
            (p["method"], p["shots"], p["lr"]): (p["mean"], p["ci95"]) for p in old["points"]
        }
        val_measured = {
            (p["method"], p["shots"]): {float(lr): v for lr, v in p["val_grid"].items()}
            for p in old["points"]
            if p.get("val_grid")
        }
        extended = {
            "lr_grid": old["lr_grid"],
            "points": [
                {k: p[k] for k in ("method", "shots", "lr", "mean", "ci95", "val_mean")}
                for p in old["points"]
            ],
        }
        previous = old.get("previous")
    elif args.out.exists():
        same = (old.get("schedule", "constant"), old["episodes"], bool(old["shift"])) == (
            SCHEDULE,
            args.episodes,
            args.shift,
        ) and (args.steps is None or old["steps"] == args.steps)
        measured = {
            (p["method"], p["shots"], p["lr"]): (p["mean"], p["ci95"])
            for p in old["points"]
            if same
        }
        previous = {
            "lr_rule": protocol[0],
            "schedule": protocol[1],
            "lr_grid": old["lr_grid"],
            "points": [
                {k: p[k] for k in ("method", "shots", "lr", "mean", "ci95", "val_mean")}
                for p in old["points"]
            ],
        }
    started = time.time()
    curve = shots_curve(
        args.runs,
        [int(k) for k in args.shots.split(",")],
        episodes=args.episodes,
        val_episodes=args.val_episodes,
        steps=args.steps,
        lr_grid=grid,
        shift=args.shift,
        methods=args.methods.split(",") if args.methods else None,
        measured=measured,
        val_measured=val_measured,
    )
    curve["wall_s"] = round(time.time() - started, 1)
    if previous:
        curve["previous"] = previous
    if extended:
        curve["wall_s"] = round(old.get("wall_s", 0.0) + curve["wall_s"], 1)
        curve["grid_previous"] = extended
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(curve, indent=2) + "\n")
    tmp.replace(args.out)


if __name__ == "__main__":
    main()
