"""Budgets: upper bounds only, the same values as Opacus's accountants, cheap to repeat."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis.prv.prvs import DiscretePRV

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


def fft_path_only(monkeypatch) -> None:
    """Make get_epsilon take the inverse FFT of the whole grid (no band-limited path)."""
    monkeypatch.setattr(budget, "_band_limited_epsilon", lambda *args: None)
    budget._COMPOSED.clear()  # spectra kept by earlier calls may be truncated


@pytest.mark.parametrize("history", HISTORIES)
@pytest.mark.parametrize("grid_steps", [0, 240])
def test_epsilon_read_from_the_unrolled_pmf_is_the_rolled_pmfs(history, grid_steps, monkeypatch):
    """get_epsilon's FFT path reads Opacus's rolled pmf through an index shift (no roll
    of the whole grid): the same epsilon, bit for bit, as the search over the rolled
    ``DiscretePRV``."""
    fft_path_only(monkeypatch)
    acc = budget.BoundedPRVAccountant(grid_steps)
    acc.history = list(history)
    fast = acc.get_epsilon(delta=1e-5)
    dprv = acc._get_dprv(eps_error=0.01, delta_error=1e-8)
    assert fast == budget._upper_epsilon(dprv, acc._grid, acc._shift, 1e-5, 1e-8, 0.01)
    assert fast >= dprv.compute_epsilon(1e-5, 1e-8, 0.01)[1]


def fft_epsilon(history, grid_steps: int, delta: float) -> float:
    """The FFT path's epsilon of ``history``, from spectra composed afresh."""
    kept = dict(budget._COMPOSED)
    budget._COMPOSED.clear()
    try:
        acc = budget.BoundedPRVAccountant(grid_steps)
        acc.history = budget.compact(history)
        pmf, roll, domain = acc._composed_pmf(0.01, delta / 1000)
        return budget._upper_epsilon(
            DiscretePRV(pmf=np.roll(pmf, roll), domain=domain.shift_right(acc._shift)),
            acc._grid,
            acc._shift,
            delta,
            delta / 1000,
            0.01,
        )
    finally:
        budget._COMPOSED.clear()
        budget._COMPOSED.update(kept)


@settings(max_examples=40, deadline=None)
@given(
    history=st.lists(
        st.tuples(
            st.sampled_from([0.7, 1.0, 1.3, 2.0]),
            st.sampled_from([0.005, 1 / 46, 1 / 30, 0.05, 0.1]),
            st.integers(1, 160),
        ),
        min_size=1,
        max_size=3,
    ),
    grid_steps=st.sampled_from([0, 240, 1000]),
    delta=st.sampled_from([1e-5, 1e-6]),
)
def test_band_limited_epsilon_is_the_fft_paths(history, grid_steps, delta):
    """Where the composed spectrum is band-limited (a few dozen steps on), epsilon is read
    from ~100 frequencies in closed form instead of an inverse FFT of the whole grid: the
    same epsilon as the FFT path (to rounding), never below it by more than rounding, and
    the path is taken for the long histories a site accumulates."""
    calls: list[float | None] = []
    band = budget._band_limited_epsilon

    def spy(*args):
        calls.append(band(*args))
        return calls[-1]

    budget._COMPOSED.clear()
    acc = budget.BoundedPRVAccountant(grid_steps)
    acc.history = budget.compact(history)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(budget, "_band_limited_epsilon", spy)
        ours = acc.get_epsilon(delta=delta)
    reference = fft_epsilon(history, grid_steps, delta)
    assert ours == pytest.approx(reference, rel=1e-9, abs=1e-12)
    assert ours >= reference - 1e-9 * abs(reference)
    assert len(calls) == 1  # taken, or declined (None) for the FFT path


@pytest.mark.parametrize("grid_steps", [240, 800])
def test_a_sites_history_takes_the_band_limited_path(grid_steps):
    """The default run's histories (sigma 1, q ~ 1/46..1/34, 8 steps a round) are read
    from the band from their fifth round on, on the run's grid, with the FFT's epsilon."""
    rounds = [(1.0, 1 / (34 + (r * 7) % 13), 8) for r in range(30)]
    budget._COMPOSED.clear()
    for done in range(5, 31):
        history = rounds[:done]
        acc = budget.BoundedPRVAccountant(grid_steps)
        acc.history = budget.compact(history)
        spectrum, roll, domain = acc._composed(0.01, 1e-8)
        shifted = domain.shift_right(acc._shift)
        band = budget._band_limited_epsilon(
            spectrum, acc._left_out, roll, domain.size, shifted.t_min, shifted.dt, 1e-5, 1e-8, 0.01
        )
        assert band is not None and len(spectrum) < domain.size // 64
        assert band == pytest.approx(fft_epsilon(history, grid_steps, 1e-5), rel=1e-9)


def test_band_limited_spectra_are_kept_truncated():
    """A composed spectrum keeps only its band (the rest sums to <= SPECTRAL_TAIL), and a
    round multiplied into a truncated spectrum gives the epsilon of a fresh composition."""
    budget._COMPOSED.clear()
    history = [(1.0, 1 / 46, 80)]
    acc = budget.BoundedPRVAccountant(240)
    acc.history = history
    acc.get_epsilon(delta=1e-5)
    (spectrum, left_out), *_ = budget._COMPOSED.values()
    assert len(spectrum) < acc._grid[2] // 64 and 0 < left_out <= budget.SPECTRAL_TAIL
    longer = [(1.0, 1 / 46, 88)]
    acc = budget.BoundedPRVAccountant(240)
    acc.history = longer
    extended = acc.get_epsilon(delta=1e-5)
    assert extended == pytest.approx(fft_epsilon(longer, 240, 1e-5), rel=1e-9)
