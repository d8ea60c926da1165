"""A whole site round with DP beside the same round without DP, measured side by side.

What one federated round costs at the sites on the default run (digits-fewshot,
Reptile, default model and settings, every site sampled): for each site
``Site.train_round`` (policies, record rules, the budget check, the durable
ledger charge, the audit log entries, the inner loop, the reply) from a fresh
theta. The DP and non-private federations run alternately, round by round, in
one process, each on its own site directories. Also reported: where the extra
time of a DP round goes (the clipping/noise inside training, the accountant).

    python benchmarks/dp_round.py [--sites 5] [--rounds 30] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import statistics
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
    ("model check before the charge (`check_dp_model`)", site_module, "check_dp_model"),
    ("ledger charge (line written and fsync'd)", PrivacyLedger, "charge"),
    (
        "DP set-up in training (flat buffer, clipper, DP optimizer)",
        dp_training,
        "_make_private_bookkeeping",
    ),
    ("unit sampler set-up", dp_training, "_unit_loader"),
    (
        "clipped backward (autograd to layer outputs, per-sample norms, clipped sums)",
        bookkeeping.BookKeepingClipper,
        "backward",
    ),
    (
        "DP step (noise, scaling, accountant hook, update)",
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sites", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        private, cfg_dp = federation(Path(tmp) / "dp", args.sites, True, args.rounds)
        plain, cfg_plain = federation(Path(tmp) / "plain", args.sites, False, args.rounds)
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
        for rnd in range(1, args.rounds + 1):
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

    load_after = os.getloadavg()[0]

    def median(times, which):  # rounds 2..R: round 1 includes the one-off model check
        return statistics.median(t[which] for t in times[1:])

    plain_cpu, dp_cpu = median(t_plain, 1), median(t_dp, 1)
    plain_wall, dp_wall = median(t_plain, 0), median(t_dp, 0)
    acc_ms = 1000 * statistics.mean(acc_dp)
    acc_median_ms = 1000 * statistics.median(acc_dp[1:])
    train_plain_ms = 1000 * statistics.median(train_plain[1:])
    train_dp_ms = 1000 * statistics.median(train_dp[1:])
    offset = len(DP_PARTS) - len(PLAIN_PARTS)
    lines = [
        "## A whole DP round beside a non-private round (`benchmarks/dp_round.py`)",
        "",
        f"Machine: {machine()}; one torch thread. Default run (digits-fewshot, Reptile, "
        f"default model and settings), {args.sites} sites all sampled, {args.rounds} rounds; "
        "each round is every site's `Site.train_round` (policies, budget check, ledger "
        "charge, audit log, training, reply), DP and non-private federations alternating "
        "round by round in one process. Median over rounds 2..R (round 1 includes the "
        "one-off model check). CPU time is this process's (robust to other load on the "
        "machine, though a saturated machine slows every operation); wall time beside it. "
        f"Load average of the machine (other jobs included): {load_before:.1f} at the "
        f"start, {load_after:.1f} at the end, on {os.cpu_count()} cores.",
        "",
        "| whole round, all sites | non-private | DP | DP / non-private | "
        "accountant per DP round (mean; median) |",
        "|---|---|---|---|---|",
        f"| CPU time | {1000 * plain_cpu:.0f} ms | {1000 * dp_cpu:.0f} ms | "
        f"{dp_cpu / plain_cpu:.2f}x | {acc_ms:.0f} ms; {acc_median_ms:.0f} ms |",
        f"| wall time | {1000 * plain_wall:.0f} ms | {1000 * dp_wall:.0f} ms | "
        f"{dp_wall / plain_wall:.2f}x | |",
        f"| of which the inner loop (`train_steps`, CPU) | {train_plain_ms:.0f} ms | "
        f"{train_dp_ms:.0f} ms | {train_dp_ms / train_plain_ms:.2f}x | |",
        "",
        "Where a DP round's extra time goes: the CPU time of the parts only a DP round "
        f"runs, median per round over rounds 2..R ({args.sites} sites; each part timed "
        "where it runs, none inside another). The last two replace the non-private "
        "inner loop's backward pass and step, shown beside them.",
        "",
        "| part of the DP round | DP round | in the non-private round |",
        "|---|---|---|",
        f"| accountant (epsilon for the budget check and the charge) | "
        f"{acc_median_ms:.1f} ms | - |",
        *(
            f"| {label} | {1000 * statistics.median(times[1:]):.1f} ms | "
            + (
                f"{PLAIN_PARTS[i - offset][0]}: "
                f"{1000 * statistics.median(part_plain[i - offset][1:]):.1f} ms |"
                if i >= offset
                else "- |"
            )
            for i, ((label, _, _), times) in enumerate(zip(DP_PARTS, part_dp, strict=True))
        ),
        "",
        f"First round (CPU): non-private {1000 * t_plain[0][1]:.0f} ms, "
        f"DP {1000 * t_dp[0][1]:.0f} ms. The accountant column is the CPU time of the "
        "epsilon evaluations that were not already cached (one per site and round: the "
        "budget check and the charge share it). Target (issue 12): a whole DP round at "
        "most 1.3x the non-private round; where the rest of the time goes: "
        "docs/privacy-accounting.md (Cost).",
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("dp-round", body)


if __name__ == "__main__":
    main()
