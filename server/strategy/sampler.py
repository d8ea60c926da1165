"""Seeded, reproducible sampling of sites by their pseudonymous site ids, with a bounded
wait for their nodes (Flower's ``sample_nodes`` waits forever)."""

from __future__ import annotations

import random
import time

from flwr.serverapp import Grid

from fedmeta.config import sites_per_round


class RunStopped(RuntimeError):
    """The run cannot continue (e.g. fewer sites than the declared minimum)."""


class SiteSampler:
    """Chooses each round's sites: seeded by (seed, round) over the sites' ids only."""

    def __init__(
        self,
        site_of_node: dict[int, str],
        *,
        seed: int,
        min_sites: int,
        node_wait_s: float,
        fraction_train: float,
    ) -> None:
        self.site_of_node = site_of_node
        self.seed, self.min_sites = seed, min_sites
        self.node_wait_s, self.fraction_train = node_wait_s, fraction_train

    def available_nodes(self, grid: Grid, needed: int) -> list[int]:
        """Known nodes that are connected, waiting at most ``node_wait_s`` for ``needed``."""
        deadline = time.monotonic() + self.node_wait_s
        while True:
            nodes = [n for n in grid.get_node_ids() if n in self.site_of_node]
            if len(nodes) >= needed or time.monotonic() >= deadline:
                return nodes
            time.sleep(0.5)

    def sample(self, server_round: int, grid: Grid) -> list[int]:
        n_known = len(self.site_of_node)
        wanted = sites_per_round(n_known, self.fraction_train, self.min_sites)
        nodes = self.available_nodes(grid, min(wanted, n_known))
        if len(nodes) < self.min_sites:
            raise RunStopped(
                f"round {server_round}: {len(nodes)} site(s) connected, fewer than "
                f"the declared minimum of {self.min_sites}; stopping the run"
            )
        ordered = sorted(nodes, key=lambda n: self.site_of_node[n])
        rng = random.Random(f"{self.seed}:{server_round}")
        chosen = rng.sample(ordered, min(wanted, len(ordered)))
        return sorted(chosen, key=lambda n: self.site_of_node[n])
