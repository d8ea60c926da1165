"""Per-round validation curves at a fine resolution (`benchmarks/rounds_curve.py`).

Re-trains the few-shot benchmark's non-private runs (`benchmarks/fewshot_accuracy.py`:
the same `fedmeta simulate` command, site settings, seeds and per-strategy curve lr)
with the server's validation evaluation every ``--every`` rounds instead of every 20.
The server's evaluation draws its episodes from its own seed and touches no training
state, so the runs are the benchmark's runs exactly: each round's global model digest
is checked against the kept run's metrics (where the kept run is on disk), and the
curve replaces the kept one in `benchmarks/results/fewshot/curves/`.

    python benchmarks/rounds_curve.py [--every 2] [--seeds 1,2,3] \
        [--strategies reptile,fedavg,fomaml]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fewshot_accuracy import (  # noqa: E402
    CURVE_LR,
    FOMAML,
    NP,
    RESULTS,
    WORK,
    keep_run,
    simulate,
)

FINE = WORK / "fine"


def digests(run: Path) -> dict[int, str]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {m["round"]: m["model_sha256"] for m in map(json.loads, lines)}


def same_training(fine: Path, kept: Path) -> bool | None:
    """True when every round both runs logged has the same global model (None: no kept run)."""
    if not (kept / "metrics.jsonl").exists():
        return None
    a, b = digests(fine), digests(kept)
    return a.keys() == b.keys() and all(a[r] == b[r] for r in a)


def fine_run(strategy: str, seed: int, rounds: int, every: int) -> Path:
    out = FINE / f"np-{strategy}-s{seed}"
    curve = [f"eval-every={every}", "eval-episodes=100", "eval-shots=5", "eval-split=val"]
    curve.append(f"adapt-lr={CURVE_LR[strategy]}")
    sets = [arg for value in curve for arg in ("--set", value)]
    extra = NP + (FOMAML if strategy == "fomaml" else [])
    simulate(out, "digits-fewshot", strategy, seed, rounds, [*sets, *extra])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--strategies", default="reptile,fedavg,fomaml")
    args = ap.parse_args()
    for seed in (int(s) for s in args.seeds.split(",")):
        for strategy in args.strategies.split(","):
            run = fine_run(strategy, seed, args.rounds, args.every)
            same = same_training(run, WORK / run.name)
            if same is False:
                sys.exit(f"{run}: global models differ from {WORK / run.name}; curve not kept")
            kept = RESULTS / "curves" / f"{run.name}.json"
            kept.unlink(missing_ok=True)
            keep_run(run)
            data = json.loads(kept.read_text())
            data["eval_every"] = args.every
            data["same_models_as_kept_run"] = same
            kept.write_text(json.dumps(data, indent=1) + "\n")
            print(f"{kept}: {len(data['curve'])} points, same models as kept run: {same}")


if __name__ == "__main__":
    main()
