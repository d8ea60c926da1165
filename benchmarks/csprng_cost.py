"""Cost of the site's CSPRNG (HKDF + ChaCha20 + Box-Muller) per DP site round.

The same DP round (fedmeta's default clipping, sigma 1, C 1) timed side by
side with seeded torch noise and sampling (simulations) and with the site's
CSPRNG streams (deployed sites), for the default site model (digits CNN) and a
~1M-parameter MLP; plus the time to draw the round's noise alone (d x steps
Gaussians) from each source.

    python benchmarks/csprng_cost.py [--reps 15]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from doc import machine, write_section  # noqa: E402
from dp_overhead import cases  # noqa: E402

from fedmeta.privacy.dp_training import DPSettings, train_steps  # noqa: E402
from fedmeta.privacy.noise import SiteRandomness  # noqa: E402


def settings(r: int, secret: bytes) -> dict[str, DPSettings | None]:
    return {
        "none": None,
        "seeded": DPSettings(1.0, 1.0),
        "site-csprng": DPSettings(1.0, 1.0, randomness=SiteRandomness(secret, "bench", r)),
    }


def time_rounds(build, pool, loss, batch, steps, reps: int, secret: bytes) -> dict[str, float]:
    times: dict[str, list[float]] = {"none": [], "seeded": [], "site-csprng": []}
    for r in range(reps + 1):
        for name, dp in settings(r, secret).items():
            torch.manual_seed(r)
            model = build()
            t0 = time.perf_counter()
            train_steps(
                model, pool, loss_fn=loss, steps=steps, lr=0.05, batch_size=batch, dp=dp, seed=r
            )
            if r:  # the first repetition warms up
                times[name].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}


def noise_only(n_params: int, steps: int, reps: int, secret: bytes) -> tuple[float, float]:
    """(seeded, CSPRNG) seconds to draw one round's noise: steps x n_params Gaussians."""
    ref = torch.zeros(n_params)
    seeded, site = [], []
    for r in range(reps + 1):
        gen = torch.Generator().manual_seed(r)
        t0 = time.perf_counter()
        for _ in range(steps):
            torch.normal(0.0, 1.0, size=ref.shape, generator=gen)
        t1 = time.perf_counter()
        rnd = SiteRandomness(secret, "bench", r)
        for _ in range(steps):
            rnd.gaussian_like(ref, 1.0)
        t2 = time.perf_counter()
        if r:
            seeded.append(t1 - t0)
            site.append(t2 - t1)
    return statistics.median(seeded), statistics.median(site)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    secret = os.urandom(32)
    lines = [
        "## CSPRNG noise cost per site round (`benchmarks/csprng_cost.py`)",
        "",
        f"Machine: {machine()}; one thread; median of {4 * args.reps} (CNN) / "
        f"{args.reps} (MLP) rounds, the three settings interleaved round by round. "
        "A round = model built from theta, DP wrapping, k DP-SGD steps (sigma 1, C 1, "
        "fedmeta's default clipping) with Poisson sampling. seeded = torch generators "
        "from the run seed (simulations); site-csprng = the site's secret, HKDF-SHA256, "
        "ChaCha20, Box-Muller (deployed sites).",
        "",
        "| model | params | batch, steps | non-private round | seeded DP round | "
        "site-csprng DP round | CSPRNG extra per round | noise alone: seeded / csprng |",
        "|---" * 8 + "|",
    ]
    for name, build, pool, loss, batch, steps in cases():
        n_params = sum(p.numel() for p in build().parameters())
        reps = 4 * args.reps if n_params < 100_000 else args.reps
        t = time_rounds(build, pool, loss, batch, steps, reps, secret)
        ns, nc = noise_only(n_params, steps, reps, secret)
        extra = t["site-csprng"] - t["seeded"]
        lines.append(
            f"| {name} | {n_params:,} | {batch}, {steps} | {1000 * t['none']:.1f} ms | "
            f"{1000 * t['seeded']:.1f} ms | {1000 * t['site-csprng']:.1f} ms | "
            f"{1000 * extra:+.1f} ms ({100 * extra / t['seeded']:+.0f}%) | "
            f"{1000 * ns:.1f} / {1000 * nc:.1f} ms |"
        )
        print(lines[-1], flush=True)
    lines += [
        "",
        "The extra cost is the keystream (8 bytes of ChaCha20 per Gaussian and per "
        "record per step for sampling, drawn on the CPU) and Box-Muller (radius in "
        "float64, on the training device). Measured on a shared machine (other jobs "
        "running): compare the columns of one row, not with other sections.",
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("csprng-cost", body)


if __name__ == "__main__":
    main()
