"""A whole site round with DP beside the same round without DP, measured side by side.

What one federated round costs at the sites on the default run (digits-fewshot,
Reptile, default model and settings, every site sampled): for each site
``Site.train_round`` (policies, record rules, the budget check, the durable
ledger charge, the audit log entries, the inner loop, the reply) from a fresh
theta. The DP and non-private federations run alternately, round by round, in
one process, each on its own site directories. Also reported: where the extra
time of a DP round goes (the clipping/noise inside training, the accountant).

    python benchmarks/dp_round.py [--sites 5] [--rounds 30] [--runs 5] [--no-write]

Each run is a fresh process (the accountant's caches start empty); the section
lists every run's ratio and shows the tables of the run with the median ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from doc import machine, write_section  # noqa: E402

from fedmeta import site as site_module  # noqa: E402
from fedmeta.config import RunConfig, build_task, run_declaration  # noqa: E402
from fedmeta.privacy import bookkeeping, budget, dp_training  # noqa: E402
from fedmeta.privacy.ledger import PrivacyLedger  # noqa: E402
from fedmeta.site import Site  # noqa: E402

#: the parts of a DP round that a non-private round does not run, timed where they run
#: (label, object, attribute); the accountant is timed apart (its uncached evaluations)
DP_PARTS = (
    (
        "model check before the charge (`check_dp_model`; once per site process)",
        dp_training,
        "check_dp_model",
    ),
    ("ledger charge (line written and fsync'd)", PrivacyLedger, "charge"),
    (
        "DP set-up in training (flat buffer, clipper, DP optimizer)",
        dp_training,
        "_make_private_bookkeeping",
    ),
    ("unit sampler set-up", dp_training, "_unit_loader"),
    (
        "noise (each step's Gaussian noise drawn into the flat gradient buffer)",
        bookkeeping.BookKeepingDPOptimizer,
        "begin_flat_step",
    ),
    (
        "clipped backward (autograd to layer outputs, per-sample norms, clipped sums "
        "added to the noise)",
        bookkeeping.BookKeepingClipper,
        "backward",
    ),
    (
        "DP step (accountant hook, update by the noisy sum / E[B])",
        bookkeeping.BookKeepingDPOptimizer,
        "flat_step",
    ),
)
#: what the non-private inner loop runs in place of the last two (same row order)
PLAIN_PARTS = (
    ("backward pass (`loss.backward()`)", torch.Tensor, ("backward",)),
    ("SGD step and `zero_grad`", torch.optim.SGD, ("step", "zero_grad")),
)


def federation(root: Path, sites: int, dp: bool, rounds: int) -> tuple[list[Site], RunConfig]:
    cfg = RunConfig(sites=sites, rounds=rounds, dp=dp, out_dir=str(root))
    return [Site(f"site-{i}", i, root / f"site-{i}", cfg) for i in range(sites)], cfg


def one_round(
    sites: list[Site], cfg: RunConfig, theta, rnd: int, declaration
) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) for every site's round."""
    wall, cpu = time.perf_counter(), time.process_time()
    for site in sites:
        reply = site.train_round(theta, "bench", rnd, declaration)
        assert not reply.declined, reply.reason
    return time.perf_counter() - wall, time.process_time() - cpu


def timed(fn):
    """Wrap ``fn`` to add the CPU time of its calls to ``wrapped.seconds``."""

    def wrapped(*a, **kw):
        t = time.process_time()
        try:
            return fn(*a, **kw)
        finally:
            wrapped.seconds += time.process_time() - t

    wrapped.seconds = 0.0
    return wrapped


def measure(sites: int, rounds: int) -> dict:
    """One side-by-side measurement in this process (fresh caches): the medians over
    rounds 2..R, in seconds, with the per-part medians and the load average."""
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        private, cfg_dp = federation(Path(tmp) / "dp", sites, True, rounds)
        plain, cfg_plain = federation(Path(tmp) / "plain", sites, False, rounds)
        task = build_task(cfg_dp)
        torch.manual_seed(0)
        theta = {
            k: v.detach().clone()
            for k, v in task.build_model(task.out_dim(cfg_dp.strategy)).state_dict().items()
        }
        decl_dp, decl_plain = run_declaration(cfg_dp), run_declaration(cfg_plain)
        account = timed(budget._epsilon.__wrapped__)
        budget._epsilon = budget.lru_cache(maxsize=1024)(account)
        train = timed(site_module.train_steps)  # the inner loop, DP-SGD or SGD
        site_module.train_steps = train
        parts = []
        for _, owner, name in DP_PARTS:
            parts.append(timed(getattr(owner, name)))
            setattr(owner, name, parts[-1])
        plain_parts = []
        for _, owner, names in PLAIN_PARTS:
            group = []
            for name in names:
                group.append(timed(getattr(owner, name)))
                setattr(owner, name, group[-1])
            plain_parts.append(group)
        t_dp, t_plain, acc_dp, train_dp, train_plain = [], [], [], [], []
        part_dp: list[list[float]] = [[] for _ in DP_PARTS]
        part_plain: list[list[float]] = [[] for _ in PLAIN_PARTS]
        for rnd in range(1, rounds + 1):
            train.seconds = 0.0
            for group in plain_parts:
                for part in group:
                    part.seconds = 0.0
            t_plain.append(one_round(plain, cfg_plain, theta, rnd, decl_plain))
            train_plain.append(train.seconds)
            for times, group in zip(part_plain, plain_parts, strict=True):
                times.append(sum(part.seconds for part in group))
            account.seconds = train.seconds = 0.0
            for part in parts:
                part.seconds = 0.0
            t_dp.append(one_round(private, cfg_dp, theta, rnd, decl_dp))
            acc_dp.append(account.seconds)
            train_dp.append(train.seconds)
            for times, part in zip(part_dp, parts, strict=True):
                times.append(part.seconds)

    def median(times: list) -> float:  # rounds 2..R: round 1 includes the one-off model check
        return statistics.median(times[1:])

    return {
        "plain_cpu": median([t[1] for t in t_plain]),
        "dp_cpu": median([t[1] for t in t_dp]),
        "plain_wall": median([t[0] for t in t_plain]),
        "dp_wall": median([t[0] for t in t_dp]),
        "accountant_mean": statistics.mean(acc_dp),
        "accountant_median": median(acc_dp),
        "train_plain": median(train_plain),
        "train_dp": median(train_dp),
        "parts_dp": [median(times) for times in part_dp],
        "parts_plain": [median(times) for times in part_plain],
        "first_plain": t_plain[0][1],
        "first_dp": t_dp[0][1],
        "load": [load_before, os.getloadavg()[0]],
    }


def ratio(result: dict) -> float:
    return result["dp_cpu"] / result["plain_cpu"]


def render(result: dict, sites: int, rounds: int, ratios: list[float]) -> str:
    """The docs section: ``result``'s tables (the run of median ratio) and every run's ratio."""
    ms = {k: 1000 * v for k, v in result.items() if isinstance(v, float)}
    load_before, load_after = result["load"]
    offset = len(DP_PARTS) - len(PLAIN_PARTS)
    runs = len(ratios)
    lines = [
        "## A whole DP round beside a non-private round (`benchmarks/dp_round.py`)",
        "",
        f"Machine: {machine()}; one torch thread. Default run (digits-fewshot, Reptile, "
        f"default model and settings), {sites} sites all sampled, {rounds} rounds; "
        "each round is every site's `Site.train_round` (policies, budget check, ledger "
        "charge, audit log, training, reply), DP and non-private federations alternating "
        "round by round in one process. Median over rounds 2..R (round 1 includes the "
        "one-off model check). CPU time is this process's (robust to other load on the "
        "machine, though a saturated machine slows every operation); wall time beside it. "
        f"Load average of the machine (other jobs included): {load_before:.1f} at the "
        f"start, {load_after:.1f} at the end, on {os.cpu_count()} cores.",
        "",
    ]
    if runs > 1:
        listed = ", ".join(f"{r:.2f}x" for r in ratios)
        lines += [
            f"{runs} runs, each in a fresh process (nothing cached from the one before); "
            f"DP / non-private CPU time per run: {listed}; median "
            f"{statistics.median(ratios):.2f}x. The tables are the median run's.",
            "",
        ]
    lines += [
        "| whole round, all sites | non-private | DP | DP / non-private | "
        "accountant per DP round (mean; median) |",
        "|---|---|---|---|---|",
        f"| CPU time | {ms['plain_cpu']:.0f} ms | {ms['dp_cpu']:.0f} ms | "
        f"{ratio(result):.2f}x | {ms['accountant_mean']:.0f} ms; "
        f"{ms['accountant_median']:.0f} ms |",
        f"| wall time | {ms['plain_wall']:.0f} ms | {ms['dp_wall']:.0f} ms | "
        f"{result['dp_wall'] / result['plain_wall']:.2f}x | |",
        f"| of which the inner loop (`train_steps`, CPU) | {ms['train_plain']:.0f} ms | "
        f"{ms['train_dp']:.0f} ms | {result['train_dp'] / result['train_plain']:.2f}x | |",
        "",
        "Where a DP round's extra time goes: the CPU time of the parts only a DP round "
        f"runs, median per round over rounds 2..R ({sites} sites; each part timed "
        "where it runs, none inside another). The last two replace the non-private "
        "inner loop's backward pass and step, shown beside them.",
        "",
        "| part of the DP round | DP round | in the non-private round |",
        "|---|---|---|",
        f"| accountant (epsilon for the budget check and the charge) | "
        f"{ms['accountant_median']:.1f} ms | - |",
        *(
            f"| {label} | {1000 * seconds:.1f} ms | "
            + (
                f"{PLAIN_PARTS[i - offset][0]}: {1000 * result['parts_plain'][i - offset]:.1f} ms |"
                if i >= offset
                else "- |"
            )
            for i, ((label, _, _), seconds) in enumerate(
                zip(DP_PARTS, result["parts_dp"], strict=True)
            )
        ),
        "",
        f"First round (CPU): non-private {ms['first_plain']:.0f} ms, "
        f"DP {ms['first_dp']:.0f} ms. The accountant column is the CPU time of the "
        "epsilon evaluations that were not already cached (one per site and round: the "
        "budget check and the charge share it). Target (issue 12): a whole DP round at "
        "most 1.3x the non-private round; where the rest of the time goes: "
        "docs/privacy-accounting.md (Cost).",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sites", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument(
        "--runs", type=int, default=5, help="measurements, each in a fresh process (>= 1)"
    )
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # one run, as JSON
    args = ap.parse_args()
    if args.json:
        print(json.dumps(measure(args.sites, args.rounds)))
        return
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    results = []
    for _ in range(args.runs):
        child = subprocess.run(
            [sys.executable, __file__, "--json", "--sites", str(args.sites)]
            + ["--rounds", str(args.rounds)],
            capture_output=True,
            text=True,
        )
        if child.returncode != 0:
            sys.exit(f"dp_round: a measurement run failed:\n{child.stderr.strip()}")
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(f"run {len(results)}: {ratio(results[-1]):.2f}x", file=sys.stderr)
    ordered = sorted(results, key=ratio)
    chosen = ordered[(len(ordered) - 1) // 2]  # the median run (the lower of two middles)
    body = render(chosen, args.sites, args.rounds, [ratio(r) for r in results])
    print(body)
    if not args.no_write:
        write_section("dp-round", body)


if __name__ == "__main__":
    main()
