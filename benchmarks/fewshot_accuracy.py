"""Scratch / FedAvg-transfer / federated Reptile few-shot accuracy, side by side.

Trains Reptile and the FedAvg baseline with the real `fedmeta simulate` (Flower
simulation, Opacus at every site), non-private and at a per-site target
epsilon, then runs `fedmeta evaluate` (same episodes, same adaptation step
budget, each method's learning rate tuned on validation classes from one grid)
and writes the table to docs/benchmarks.md.

    python benchmarks/fewshot_accuracy.py [--rounds 300] [--episodes 400] [--seeds 1,2,3] [--quick]

The first seed gives the full tables (non-private, DP, sine); every further seed
retrains the non-private digits pair, so the Reptile-minus-transfer gap is also
reported across training seeds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from doc import machine, write_section  # noqa: E402

FEDMETA = [sys.executable, "-m", "fedmeta.cli"]
REFERENCE = {"scratch": (57.5, 63.3, 61.9), "transfer": (73.7, 87.9, 90.4),
             "meta": (77.2, 92.1, 95.1)}  # centralized, non-private (issue #2)
LABEL = {"scratch": "scratch", "transfer": "FedAvg-transfer", "meta": "Reptile"}
# Site training settings per privacy regime, the same for both strategies. Chosen on
# validation classes (in-process sweep of inner lr 0.1/0.3/0.5, batch 10/25/50/200, steps
# 8/16/32, Adam vs SGD): without DP, inner lr 0.3 with batch 50 is best; under DP an inner
# lr above 0.1 lets the noise (sigma * C / B per coordinate, times lr) destroy training,
# so DP runs keep the defaults (batch 10, lr 0.1).
SITE = {"private": ["--set", "inner-lr=0.3", "--set", "batch-size=50"], "dp": []}


def sh(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def train(out: Path, task: str, strategy: str, rounds: int, dp: list[str], extra: list[str],
          seed: int = 1):
    if (out / "summary.json").exists():
        return json.loads((out / "summary.json").read_text())
    sh([*FEDMETA, "simulate", "--task", task, "--strategy", strategy, "--sites", "10",
        "--rounds", str(rounds), "--seed", str(seed), "--out", str(out), "--overwrite",
        "--set", "eval-every=0", *dp, *extra])
    return json.loads((out / "summary.json").read_text())


def evaluate(runs: list[Path], out: Path, shots: str, episodes: int, steps: int) -> dict:
    if out.with_suffix(".json").exists():  # delete it to re-evaluate
        return json.loads(out.with_suffix(".json").read_text())
    sh([*FEDMETA, "evaluate", *map(str, runs), "--shots", shots, "--episodes", str(episodes),
        "--steps", str(steps), "--out", str(out)])
    return json.loads(out.with_suffix(".json").read_text())


def suffix(seed: int) -> str:
    """Run-directory suffix: seed 1 keeps the plain names."""
    return "" if seed == 1 else f"-seed{seed}"


def mean_of(curve: dict, method: str, k: int) -> float:
    return 100 * next(p["mean"] for p in curve["points"]
                      if p["method"] == method and p["shots"] == k)


def seed_table(by_seed: dict[int, dict], shots: list[int]) -> list[str]:
    """Non-private Reptile and transfer per training seed, and Reptile's lead over transfer."""
    lines = ["**non-private, across training seeds** (Reptile / FedAvg-transfer; "
             "lead = Reptile minus transfer, points)", "",
             "| seed | " + " | ".join(f"{k}-shot" for k in shots) + " | "
             + " | ".join(f"lead {k}-shot" for k in shots) + " |",
             "|---|" + "---|" * (2 * len(shots))]
    acc = {(m, k): [mean_of(c, m, k) for c in by_seed.values()]
           for m in ("meta", "transfer") for k in shots}

    def row(label: str, meta: list[float], transfer: list[float]) -> str:
        pairs = list(zip(meta, transfer, strict=True))
        return (f"| {label} | " + " | ".join(f"{a:.1f} / {b:.1f}" for a, b in pairs)
                + " | " + " | ".join(f"{a - b:+.1f}" for a, b in pairs) + " |")

    for i, seed in enumerate(by_seed):
        lines.append(row(str(seed), [acc["meta", k][i] for k in shots],
                         [acc["transfer", k][i] for k in shots]))
    lines.append(row("mean", [float(np.mean(acc["meta", k])) for k in shots],
                     [float(np.mean(acc["transfer", k])) for k in shots]))
    return [*lines, ""]


def table(curve: dict, shots: list[int]) -> list[str]:
    rows = []
    for method in ("scratch", "transfer", "meta"):
        pts = {p["shots"]: p for p in curve["points"] if p["method"] == method}
        cells = [f"{100 * pts[k]['mean']:.1f} ± {100 * pts[k]['ci95']:.1f} (lr {pts[k]['lr']:g})"
                 for k in shots]
        rows.append(f"| {LABEL[method]} | " + " | ".join(cells) + " |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--episodes", type=int, default=400)
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--work", type=Path, default=Path("runs/bench"))
    ap.add_argument("--seeds", default="1,2,3",
                    help="training seeds; the first gives the full tables")
    ap.add_argument("--quick", action="store_true", help="few rounds/episodes (smoke test)")
    args = ap.parse_args()
    seeds = [int(x) for x in args.seeds.split(",")]
    if args.quick:
        args.rounds, args.episodes, seeds = 5, 20, seeds[:2]
    work = args.work
    started = time.time()
    shots = [1, 5, 10]
    results: dict[str, dict] = {}
    walls: list[str] = []
    budget = {"private": ["--no-dp"],
              "dp": ["--set", f"target-epsilon={args.epsilon}",
                     "--set", f"epsilon-max={args.epsilon}"]}
    for privacy, dp in budget.items():
        runs = [work / f"digits-{s}-{privacy}{suffix(seeds[0])}" for s in ("reptile", "fedavg")]
        summaries = [train(r, "digits-fewshot", s, args.rounds, dp, SITE[privacy], seeds[0])
                     for r, s in zip(runs, ("reptile", "fedavg"), strict=True)]
        results[privacy] = evaluate(runs, work / f"curve-digits-{privacy}{suffix(seeds[0])}",
                                    ",".join(map(str, shots)), args.episodes, 20)
        results[privacy]["epsilon"] = {s["strategy"]: s["epsilon"] for s in summaries}
        walls += [f"{s['strategy']} {privacy} {s['wall_s']:.0f} s" for s in summaries]
    by_seed = {seeds[0]: results["private"]}
    for seed in seeds[1:]:
        runs = [work / f"digits-{s}-private{suffix(seed)}" for s in ("reptile", "fedavg")]
        for r, s in zip(runs, ("reptile", "fedavg"), strict=True):
            train(r, "digits-fewshot", s, args.rounds, budget["private"], SITE["private"], seed)
        by_seed[seed] = evaluate(runs, work / f"curve-digits-private{suffix(seed)}",
                                 ",".join(map(str, shots)), args.episodes, 20)
    sine_runs = [work / f"sine-{s}{suffix(seeds[0])}" for s in ("reptile", "fedavg")]
    for r, s in zip(sine_runs, ("reptile", "fedavg"), strict=True):
        train(r, "sine", s, args.rounds, ["--no-dp"], [], seeds[0])
    sine = evaluate(sine_runs, work / f"curve-sine{suffix(seeds[0])}", "10", args.episodes, 32)

    lines = ["## Few-shot accuracy on `digits-fewshot` (`benchmarks/fewshot_accuracy.py`)", "",
             f"Machine: {machine()}. 10 sites, {args.rounds} rounds, 5 sites/round, "
             f"seed {seeds[0]}; 5-way, 20 adaptation steps, {args.episodes} test episodes "
             "per cell (mean ± 95% CI); "
             "each method's adaptation lr picked on validation classes from "
             "{0.01, 0.03, 0.1, 0.3, 1}. Simulation wall time per run: "
             + ", ".join(walls) + f"; this script (runs already trained are reused) "
             f"{(time.time() - started) / 60:.0f} min.", ""]
    for privacy in ("private", "dp"):
        title = ("non-private (sites: inner lr 0.3, batch 50, 8 steps)" if privacy == "private"
                 else f"DP, target epsilon {args.epsilon:g} per site (delta 1e-5; sites: "
                 "inner lr 0.1, batch 10, 8 steps)")
        lines += [f"**{title}**", "", "| method | 1-shot | 5-shot | 10-shot |",
                  "|---|---|---|---|", *table(results[privacy], shots), ""]
        if privacy == "dp":
            for strat, eps in results[privacy]["epsilon"].items():
                vals = sorted(eps.values())
                if vals:
                    lines.append(f"- {strat}: epsilon spent per site {vals[0]:.2f} .. "
                                 f"{vals[-1]:.2f}")
            lines.append("")
    lines += ["Centralized non-private reference (issue #2, small CNN, 20 steps, 400 episodes): "
              + "; ".join(f"{LABEL[m]} {' / '.join(map(str, v))} %" for m, v in REFERENCE.items()),
              ""]
    if len(by_seed) > 1:
        lines += seed_table(by_seed, shots)
    pts = {p["method"]: p for p in sine["points"]}
    lines += ["**sine** (10 support points, 32 adaptation steps, MSE, lower is better): " +
              ", ".join(f"{LABEL[m]} {pts[m]['mean']:.3f} ± {pts[m]['ci95']:.3f}"
                        for m in ("scratch", "transfer", "meta")), ""]
    body = "\n".join(lines)
    print(body)
    if not args.quick:
        write_section("fewshot-accuracy", body)


if __name__ == "__main__":
    main()
