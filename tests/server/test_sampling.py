"""Seeded site sampling (``SiteAwareMixin.sample``) on a real grid of simulated nodes."""

from __future__ import annotations

from collections import Counter

import pytest
from flwr.clientapp import ClientApp
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmeta.config import sites_per_round
from fedmeta.inline_grid import InlineGrid
from server.strategy.fedavg import FedAvgBaseline
from server.strategy.reptile import Reptile
from server.strategy.sites import RunStopped


def strategy_on(
    grid: InlineGrid,
    *,
    seed: int,
    fraction: float,
    min_sites: int = 1,
    known: int | None = None,
    cls: type = Reptile,
):
    """A strategy whose known sites are the grid's nodes (site-i = partition i), plus
    ``known - len(nodes)`` sites that never connect."""
    sites = {n: f"site-{c.node_config['partition-id']}" for n, c in grid.contexts.items()}
    for extra in range(len(sites), known or len(sites)):
        sites[-1 - extra] = f"site-{extra}"
    strat = (
        Reptile(beta0=1.0, beta_final=0.5, num_rounds=10, fraction_train=fraction)
        if cls is Reptile
        else FedAvgBaseline(fraction_train=fraction)
    )
    strat.setup_sites(
        sites=sites, seed=seed, min_sites=min_sites, node_wait_s=0.0, max_update_norm=100.0
    )
    return strat


def sampled(strat, grid: InlineGrid, server_round: int) -> list[str]:
    return [strat.site_of_node[n] for n in strat.sample(server_round, grid)]


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 12),
    fraction=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**31),
    server_round=st.integers(1, 500),
)
def test_the_sample_depends_on_seed_round_and_site_ids_only(n, fraction, seed, server_round):
    # two grids: other node ids, other strategy class; the same sites and seed
    a, b = InlineGrid(ClientApp(), n), InlineGrid(ClientApp(), n)
    first = sampled(strategy_on(a, seed=seed, fraction=fraction), a, server_round)
    second = sampled(
        strategy_on(b, seed=seed, fraction=fraction, cls=FedAvgBaseline), b, server_round
    )
    assert first == second
    assert len(first) == min(n, sites_per_round(n, fraction, 1))
    assert first == sorted(set(first))  # no site twice, in site order


def test_rounds_and_seeds_draw_different_samples_and_every_site_its_share():
    grid = InlineGrid(ClientApp(), 10)
    strat = strategy_on(grid, seed=7, fraction=0.3)
    draws = [tuple(sampled(strat, grid, r)) for r in range(1, 401)]
    assert all(len(d) == 3 for d in draws)
    assert len(set(draws)) > 50  # not one fixed subset
    counts = Counter(site for d in draws for site in d)
    assert set(counts) == {f"site-{i}" for i in range(10)}
    assert all(80 <= c <= 160 for c in counts.values()), counts  # expected 120 each
    other = strategy_on(grid, seed=8, fraction=0.3)
    assert [tuple(sampled(other, grid, r)) for r in range(1, 401)] != draws
    assert [tuple(sampled(strat, grid, r)) for r in range(1, 401)] == draws  # no hidden state


def test_only_connected_sites_are_sampled_and_too_few_stop_the_run():
    grid = InlineGrid(ClientApp(), 3)
    strat = strategy_on(grid, seed=1, fraction=1.0, known=5)  # site-3, site-4 never connect
    assert sampled(strat, grid, 1) == ["site-0", "site-1", "site-2"]
    short = strategy_on(grid, seed=1, fraction=1.0, min_sites=4, known=5)
    with pytest.raises(RunStopped, match="fewer than the declared minimum of 4"):
        short.sample(1, grid)


def test_min_sites_raises_the_sample_above_the_fraction():
    grid = InlineGrid(ClientApp(), 8)
    strat = strategy_on(grid, seed=3, fraction=0.1, min_sites=3)
    assert all(len(sampled(strat, grid, r)) == 3 for r in range(1, 20))
