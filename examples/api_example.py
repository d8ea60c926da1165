"""fedmeta's Python API, end to end: simulate with a per-round callback, read the typed
results, evaluate the model, stop a run and resume it, write the compliance report.

    python examples/api_example.py [RUN_ROOT]      # default: runs/api-example

Runs in about a minute on a laptop CPU (the in-process backend, few rounds).
"""

from __future__ import annotations

import sys
from pathlib import Path

import fedmeta
from fedmeta.report import write_report


def main(root: Path) -> int:
    settings = {
        "task": "digits-fewshot",
        "sites": 3,
        "rounds": 4,
        "fraction-train": 1.0,
        "eval-every": 2,
        "eval-episodes": 5,
        "inner-steps": 4,
        "checkpoint-every": 1,
    }

    # 1. a run, with a callback after every round (round 0 is the initial model)
    def show(m: fedmeta.RoundMetrics) -> None:
        acc = f"  adapted accuracy {m.eval.adapted:.3f}" if m.eval and m.eval.adapted else ""
        print(f"round {m.round}: used {m.used or '-'} declined {sorted(m.declined) or '-'}{acc}")

    result = fedmeta.simulate(
        settings, out_dir=str(root / "run"), backend="inline", overwrite=True, on_round=show
    )
    print(f"run {result.run_id}: {result.status}, {result.aggregated_rounds} rounds aggregated")
    print("epsilon spent per site:", {s: round(e, 3) for s, e in result.epsilon.items()})
    assert result.final_model is not None  # theta, as a state dict

    # 2. evaluate the final model on held-out classes (5-shot, the run's settings)
    ev = fedmeta.evaluate(result.run_dir, episodes=10)
    print(
        f"{ev.n_way}-way {ev.shots}-shot {ev.metric}: adapted {ev.adapted:.3f}, "
        f"un-adapted {ev.unadapted:.3f}"
    )

    # 3. a run stopped midway (here by its own callback) resumes from its last checkpoint
    class Stop(Exception):
        pass

    def stop_after_two(m: fedmeta.RoundMetrics) -> None:
        if m.round == 2:
            raise Stop("stopped by the example after round 2")

    stopped = root / "stopped"
    try:
        fedmeta.simulate(
            settings,
            out_dir=str(stopped),
            backend="inline",
            overwrite=True,
            on_round=stop_after_two,
        )
    except Stop as exc:
        print(f"stopped: {exc}")
    resumed = fedmeta.simulate(resume=stopped, backend="inline")
    print(
        f"resumed run {resumed.run_id}: {resumed.status}, rounds "
        f"{[m.round for m in resumed.rounds]}"
    )

    # 4. a run that cannot train fails loudly (RunFailed), with each site's reason
    try:
        fedmeta.simulate(
            settings,
            out_dir=str(root / "failing"),
            backend="inline",
            overwrite=True,
            **{"epsilon-max": 0.01, "target-epsilon": 0.0},
        )
    except fedmeta.RunFailed as exc:
        failure = exc.result.failure
        print(f"as expected, the run failed: {failure.reason if failure else exc}")
        for site, why in list(failure.sites.items())[:3] if failure else []:
            print(f"  {site}: {why}")

    # 5. the compliance report of the first run
    path = write_report(result.run_dir, "json")
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/api-example")))
