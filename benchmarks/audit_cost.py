"""What the audit log costs per federated round, beside what the round itself costs.

Writes, on real files with fsync and Ed25519 signatures, exactly the entries a
round produces: at the server `round.start`, one `round.receipt` per site,
`round.end` and a `checkpoint`; at each site `policy.site`, `policy.records`,
`round.train`, `round.reply` (and the open/close of its log, since a deployed
node opens it per message). Compared with one site's DP training round
measured side by side.

    python benchmarks/audit_cost.py [--sites 5] [--rounds 50]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from doc import machine, write_section  # noqa: E402

from fedmeta.audit import AuditLog, verify_log  # noqa: E402
from fedmeta.data.tasks import get_task  # noqa: E402
from fedmeta.privacy.dp_training import DPSettings, train_steps  # noqa: E402

H = "a" * 64


def server_round(log: AuditLog, r: int, sites: int) -> None:
    log.append(
        "round.start",
        run_id="bench",
        round=r,
        decision="allow",
        model_out=H,
        counts={"sampled": sites},
    )
    for s in range(sites):
        log.append(
            "round.receipt",
            run_id="bench",
            round=r,
            details={"site": f"site-{s}", "receipt": f"{4 * r}:{H}"},
        )
    log.append(
        "round.end",
        run_id="bench",
        round=r,
        decision="allow",
        model_in=H,
        model_out=H,
        counts={"used": sites},
    )
    log.checkpoint("bench", r)


def site_round(path: Path, key: Path, r: int) -> None:
    with AuditLog.open(path, key, actor="site-0") as log:
        log.append(
            "policy.site", run_id="bench", round=r, decision="allow", rule_ids=["GDPR-6", "PRIV-DP"]
        )
        log.append(
            "policy.records",
            run_id="bench",
            round=r,
            decision="allow-with-exclusions",
            counts={"GDPR-17": 3},
            details={"records": 480, "allowed": 477},
        )
        log.append("round.train", run_id="bench", round=r, model_in=H, epsilon=1.0)
        log.append("round.reply", run_id="bench", round=r, model_out=H, epsilon=1.0)
        log.head()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sites", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp())
    server_t, site_t, train_t = [], [], []
    task = get_task("digits-fewshot")
    pool = task.episode_pool(task.site_records(0), np.random.default_rng(0))
    with AuditLog.open(tmp / "server.jsonl", tmp / "server.pem", actor="server") as log:
        for r in range(1, args.rounds + 1):
            t0 = time.perf_counter()
            server_round(log, r, args.sites)
            server_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            site_round(tmp / "site.jsonl", tmp / "site.pem", r)
            site_t.append(time.perf_counter() - t0)
            if r <= 15:
                model = task.build_model(5)
                t0 = time.perf_counter()
                train_steps(
                    model,
                    pool,
                    loss_fn=task.loss_fn(),
                    steps=8,
                    lr=0.1,
                    batch_size=10,
                    dp=DPSettings(1.0, 1.0),
                    seed=r,
                )
                train_t.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    assert verify_log(tmp / "server.jsonl").ok
    verify_s = time.perf_counter() - t0
    n_server = len((tmp / "server.jsonl").read_text().splitlines())
    ms = lambda xs: 1000 * statistics.median(xs)  # noqa: E731
    body = "\n".join(
        [
            "## Audit log cost per round (`benchmarks/audit_cost.py`)",
            "",
            f"Machine: {machine()}. Median over {args.rounds} rounds, real files, fsync, Ed25519.",
            "",
            "| what | per round | beside one site's DP round (digits CNN, 8 steps) |",
            "|---|---|---|",
            f"| server: start + {args.sites} receipts + end + checkpoint "
            f"({args.sites + 3} entries) "
            f"| {ms(server_t):.2f} ms | {ms(server_t) / ms(train_t):.1%} |",
            f"| site: open + 4 entries + head | {ms(site_t):.2f} ms | "
            f"{ms(site_t) / ms(train_t):.1%} |",
            f"| site DP training round itself | {ms(train_t):.1f} ms | 100% |",
            "",
            f"Verifying the server log ({n_server} entries) took {1000 * verify_s:.0f} ms.",
        ]
    )
    print(body)
    if not args.no_write:
        write_section("audit-cost", body)


if __name__ == "__main__":
    main()
