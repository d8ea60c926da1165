"""Budgets: upper bounds only, the same values as Opacus's accountants, cheap to repeat."""

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fedmeta.privacy import budget
from fedmeta.privacy.budget import (
    BudgetError,
    epsilon,
    expected_batch_size,
    gdp_beside_bound,
    noise_for_target,
)

HISTORIES = [
    [(1.0, 1 / 30, 8)],
    [(1.0, 1 / 30, 96)],
    [(1.0, 1 / 30, 80), (1.0, 1 / 31, 88)],
    [(0.8, 0.05, 8), (1.2, 0.04, 16)],
    [(3.0, 0.01, 10)],
]


@pytest.mark.parametrize("history", HISTORIES)
def test_prv_epsilon_is_opacus_prv_and_bounds_its_estimate(history):
    acc = PRVAccountant()
    acc.history = list(history)
    opacus_upper = acc.get_epsilon(delta=1e-5)
    estimate = acc._get_dprv(eps_error=0.01, delta_error=1e-8).compute_epsilon(1e-5, 1e-8, 0.01)[1]
    ours = epsilon(history, 1e-5, "prv")
    assert ours >= estimate
    assert ours == pytest.approx(opacus_upper, rel=1e-3, abs=1e-3)


@pytest.mark.parametrize("history", HISTORIES)
def test_rdp_epsilon_is_opacus_rdp(history):
    acc = RDPAccountant()
    acc.history = list(history)
    assert epsilon(history, 1e-5, "rdp") == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)


def test_gdp_never_decides_a_budget_but_can_be_shown_beside_a_bound():
    hist = [(1.0, 0.05, 80)]
    with pytest.raises(BudgetError, match="'gdp' is an approximation.*'prv'"):
        epsilon(hist, 1e-5, "gdp")
    with pytest.raises(BudgetError, match="approximation"):
        noise_for_target(8.0, 1e-5, 0.05, 80, "gdp")
    shown = gdp_beside_bound(hist, 1e-5)
    assert shown["bound_accountant"] == "prv"
    assert shown["bound"] == epsilon(hist, 1e-5, "prv")
    assert 0 < shown["gdp_approximation"] < 10


def test_check_and_charge_share_one_evaluation():
    """The budget check and the charge ask for the same compacted history: one evaluation."""
    hist = [(1.1, 1 / 29, 8)] * 3
    budget._epsilon.cache_clear()
    epsilon(hist + [(1.1, 1 / 29, 8)], 1e-5)  # the check: history + this round
    epsilon([(1.1, 1 / 29, 32)], 1e-5)  # the charge, compacted the same way
    info = budget._epsilon.cache_info()
    assert (info.misses, info.hits) == (1, 1)


def test_expected_batch_is_never_rounded_to_zero():
    assert expected_batch_size(49, 1) == 1  # int(49 * (1/49)) == 0 in floating point
    assert expected_batch_size(302, 10) == 302 // 31
    with pytest.raises(ValueError, match="at least one record"):
        expected_batch_size(0, 10)


@pytest.mark.parametrize("history", HISTORIES)
def test_a_grid_for_the_whole_run_gives_the_same_bound(history):
    """A grid chosen for more steps (a site's whole run) is wider and finer than the
    history needs: still at least Opacus's estimate, and Opacus's upper end to 1e-3."""
    acc = PRVAccountant()
    acc.history = list(history)
    estimate = acc._get_dprv(eps_error=0.01, delta_error=1e-8).compute_epsilon(1e-5, 1e-8, 0.01)[1]
    steps = sum(n for _, _, n in history)
    for grid_steps in (steps, 4 * steps + 1, 1000):
        ours = epsilon(history, 1e-5, "prv", grid_steps=grid_steps)
        assert ours >= estimate
        assert ours == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-3, abs=1e-3)


def test_rounds_of_a_run_share_one_grid():
    """Inside one run every round's history is evaluated on the run's grid: a new round
    multiplies in its steps, it does not discretise the PRV again."""
    step = (1.0, 1 / 45, 8)
    budget._spectrum.cache_clear()
    for rounds in range(1, 8):
        epsilon([step] * rounds, 1e-5, "prv", grid_steps=240)
    assert budget._spectrum.cache_info().misses == 1  # the first round's discretisation


@pytest.mark.parametrize("history", HISTORIES)
@pytest.mark.parametrize("grid_steps", [0, 240])
def test_epsilon_read_from_the_unrolled_pmf_is_the_rolled_pmfs(history, grid_steps):
    """get_epsilon reads Opacus's rolled pmf through an index shift (no roll of the whole
    grid): the same epsilon, bit for bit, as the search over the rolled ``DiscretePRV``."""
    acc = budget.BoundedPRVAccountant(grid_steps)
    acc.history = list(history)
    fast = acc.get_epsilon(delta=1e-5)
    dprv = acc._get_dprv(eps_error=0.01, delta_error=1e-8)
    assert fast == budget._upper_epsilon(dprv, acc._grid, acc._shift, 1e-5, 1e-8, 0.01)
    assert fast >= dprv.compute_epsilon(1e-5, 1e-8, 0.01)[1]
