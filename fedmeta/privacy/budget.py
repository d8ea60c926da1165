"""Budget arithmetic on top of Opacus's accountants (upper bounds only, cheap to repeat).

A site's whole privacy history is a list of ``(noise_multiplier, sample_rate,
steps)`` — exactly Opacus's accountant ``history``. Composition does not depend
on order, so equal ``(sigma, q)`` entries are merged before an accountant is
asked (PRV's cost grows with distinct entries).

Only accountants that *upper-bound* epsilon decide a budget: ``prv`` (Opacus's
PRV accountant, Gopi et al. 2021, returning the upper end of its error
interval) and ``rdp`` (Mironov 2017/2019). ``gdp`` (Dong, Roth & Su) is a
central-limit approximation that can fall below the true epsilon; it is refused
for budgets, and ``gdp_beside_bound`` reports it next to a bounding accountant.

Cost: a site round asks for the epsilon of ``history + step`` (check and
charge: one evaluation, then cached by compacted history). Opacus's PRV
accountant spends most of its time on parts that do not depend on the step
count: the per-step RDP curve of each ``(sigma, q)`` (for the safe domain) and
the mean of each truncated PRV (a numerical integral). ``BoundedPRVAccountant``
keeps both across calls by choosing the discretisation domain on a coarse
grid — a domain at least as wide and a mesh at least as fine as Opacus's, which
only shrinks the truncation and discretisation errors its bound accounts for —
so a new round costs one discretisation and one FFT composition. A site passes
``grid_steps`` (the most steps it can have spent by the end of the run), so one
grid serves the whole run: each new ``(sigma, q)`` is discretised once. Once the
composed spectrum is band-limited (a few dozen steps on), a round multiplies in
only its band and reads epsilon from it in closed form (``_band_limited_epsilon``,
~0.2 ms); before that, a round's epsilon is one inverse FFT of the whole grid and
a few passes over it (~1 ms at the default run's 81,920 points).
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable
from functools import lru_cache

import numpy as np
from opacus.accountants import PRVAccountant, create_accountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.analysis.prv import (
    Domain,
    PoissonSubsampledGaussianPRV,
    TruncatedPrivacyRandomVariable,
)
from opacus.accountants.analysis.prv.prvs import DiscretePRV
from opacus.accountants.rdp import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from scipy.fft import irfft, rfft

Step = tuple[float, float, int]
BOUNDING_ACCOUNTANTS = ("prv", "rdp")


class BudgetError(ValueError):
    """A budget was asked of an accountant that does not bound epsilon (one line)."""


def require_bound(accountant: str) -> str:
    """``accountant`` if it upper-bounds epsilon, else BudgetError naming the fix."""
    if accountant not in BOUNDING_ACCOUNTANTS:
        raise BudgetError(
            f"accountant {accountant!r} is an approximation, not an upper bound "
            "on epsilon, and cannot decide a privacy budget; use 'prv' (default) "
            "or 'rdp'"
        )
    return accountant


def merge_steps(
    history: Iterable[Step], into: dict[tuple[float, float], int] | None = None
) -> dict[tuple[float, float], int]:
    """Steps per (sigma, q) of ``history`` (entries without steps left out), added to
    ``into`` (changed in place) when given."""
    merged: dict[tuple[float, float], int] = {} if into is None else into
    for sigma, q, steps in history:
        if steps:
            key = (float(sigma), float(q))
            merged[key] = merged.get(key, 0) + int(steps)
    return merged


def compact(history: Iterable[Step]) -> list[Step]:
    """Merge entries with equal (sigma, q); order-independent, same epsilon."""
    return [(s, q, n) for (s, q), n in sorted(merge_steps(history).items())]


def epsilon(
    history: Iterable[Step], delta: float, accountant: str = "prv", grid_steps: int = 0
) -> float:
    """Cumulative epsilon of ``history`` at ``delta`` (0.0 for an empty history).

    An upper bound: ``accountant`` must be 'prv' or 'rdp' (BudgetError otherwise).
    With ``grid_steps``, PRV's discretisation is the one for a history of at least
    that many steps (wider and finer than this history needs: the same bound, and
    one grid for every history up to that length).
    """
    return epsilon_merged({}, history, delta, accountant, grid_steps)


def epsilon_merged(
    merged: dict[tuple[float, float], int],
    extra: Iterable[Step],
    delta: float,
    accountant: str = "prv",
    grid_steps: int = 0,
) -> float:
    """``epsilon`` of a history given as its steps per (sigma, q) (``merge_steps``; a
    ledger keeps them between calls instead of merging every entry again) plus
    ``extra``: the same value, and the same cache entry, as ``epsilon`` of the whole
    (the compacted history is the cache key)."""
    steps = merge_steps(extra, dict(merged))
    history = tuple((s, q, n) for (s, q), n in sorted(steps.items()))
    return _epsilon(history, float(delta), require_bound(accountant), int(grid_steps))


def gdp_beside_bound(
    history: Iterable[Step], delta: float, bound: str = "prv"
) -> dict[str, float | str]:
    """GDP's approximate epsilon, for display only, beside a bounding accountant's value."""
    hist = compact(history)
    approx = 0.0
    if hist:
        with warnings.catch_warnings():  # Opacus warns that GDP can underestimate: we say so
            warnings.simplefilter("ignore")
            acc = create_accountant("gdp")
            acc.history = list(hist)
            approx = float(acc.get_epsilon(delta=delta))
    return {
        "gdp_approximation": approx,
        "bound": epsilon(hist, delta, bound),
        "bound_accountant": bound,
    }


@lru_cache(maxsize=1024)
def _epsilon(
    history: tuple[Step, ...], delta: float, accountant: str, grid_steps: int = 0
) -> float:
    if not history:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in history):
        return math.inf
    if accountant == "rdp":
        return _rdp_epsilon(history, delta)
    acc = BoundedPRVAccountant(grid_steps)
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))


# ---- RDP with a per-(sigma, q) curve kept between calls ------------------------------
ORDERS = tuple(RDPAccountant.DEFAULT_ALPHAS)


@lru_cache(maxsize=256)
def _rdp_per_step(sigma: float, q: float) -> np.ndarray:
    """Opacus's RDP of one Poisson-subsampled Gaussian step at every default order."""
    return np.asarray(
        rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(ORDERS))
    )


#: integer orders: their RDP has a closed form (fast); a bound over fewer orders is larger
WIDTH_ORDERS = tuple(range(2, 65))


@lru_cache(maxsize=256)
def _rdp_width_per_step(sigma: float, q: float) -> np.ndarray:
    return np.asarray(
        rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(WIDTH_ORDERS))
    )


_WIDTH_ALPHAS = np.asarray(WIDTH_ORDERS, dtype=float)
#: the conversion's terms that depend on the order alone: 1 / (alpha - 1) and
#: log((alpha - 1) / alpha) - log(alpha) / (alpha - 1)
_INV_ALPHA_M1 = 1.0 / (_WIDTH_ALPHAS - 1)
_ORDER_TERM = np.log((_WIDTH_ALPHAS - 1) / _WIDTH_ALPHAS) - np.log(_WIDTH_ALPHAS) * _INV_ALPHA_M1


def _rdp_widths(rdp_rows: np.ndarray, delta: float) -> np.ndarray:
    """For each row of RDP values over the integer orders, the epsilon at ``delta`` by
    Opacus's ``get_privacy_spent`` formula (Balle et al. 2020, Theorem 21; inf where no
    order gives a number), all rows in one pass: an upper bound >= Opacus's RDP over its
    default orders, so a PRV domain at least this wide is at least as wide as Opacus's.
    (rdp - (log delta + log alpha) / (alpha - 1) + log((alpha - 1) / alpha), the terms of
    the order alone computed once.)"""
    eps = rdp_rows - math.log(delta) * _INV_ALPHA_M1 + _ORDER_TERM
    return np.where(np.isnan(eps), np.inf, eps).min(axis=-1)


@lru_cache(maxsize=64)
def _width_rows(pairs: tuple[tuple[float, float], ...]) -> np.ndarray:
    """The per-step RDP of each (sigma, q) of ``pairs`` over the integer orders, stacked."""
    return np.stack([_rdp_width_per_step(sigma, q) for sigma, q in pairs])


def _fft_size(points: float) -> int:
    """The smallest even size >= points of the form m * 2^k, m in {4, 5, 6, 7}."""
    k = max(0, math.floor(math.log2(max(points, 8) / 4)))
    while True:
        for m in (4, 5, 6, 7):
            if m * 2**k >= points:
                return m * 2**k
        k += 1


def _rdp_epsilon(history: Iterable[Step], delta: float) -> float:
    """Exactly ``RDPAccountant.get_epsilon``: steps x per-step RDP, summed, converted."""
    rdp = sum(n * _rdp_per_step(s, q) for s, q, n in history)
    eps, _ = rdp_analysis.get_privacy_spent(orders=list(ORDERS), rdp=rdp, delta=delta)
    return float(eps)


# ---- PRV with reusable pieces -----------------------------------------------------
def safe_domain(
    pairs: tuple[tuple[float, float], ...],
    counts: tuple[int, ...],
    grid_steps: int,
    eps_error: float,
    delta_error: float,
) -> Domain:
    """Opacus's safe domain (Gopi et al., remark 5.6) for ``counts[i]`` steps of each
    (sigma, q) of ``pairs``, on a grid that serves a site for many rounds: the width and
    the mesh are Opacus's rules for the history scaled up to the next power of 4 of its
    steps (or of ``grid_steps``; wider and finer than Opacus's choice for the history
    itself, never less), the width's RDP bound taken over integer orders only (a larger
    epsilon, so a wider domain), the number of points rounded up to an FFT-friendly size
    (1, 1.25, 1.5 or 1.75 times a power of two). Within a bucket the grid stays put as
    rounds are added, so each (sigma, q)'s spectrum is kept."""
    steps = sum(counts)
    bucket = 4 ** math.ceil(math.log(max(steps, grid_steps), 4))
    scaled = [math.ceil(n * bucket / steps) for n in counts]
    total = sum(scaled)
    per_step = _width_rows(pairs)
    history_rdp = (np.asarray(scaled, dtype=float)[:, None] * per_step).sum(0)
    # the history's RDP bound at delta_error / 4, and each step's at delta_error / 8k
    half_width = float(_rdp_widths(history_rdp, delta_error / 4))
    half_width = max(half_width, float(_rdp_widths(per_step, delta_error / (8 * total)).max()))
    half_width = max(half_width, eps_error) + 3
    # Opacus's mesh rule at the bucket's step count (>= steps: a finer mesh)
    mesh = eps_error / math.sqrt(bucket * math.log(12 / delta_error) / 2)
    # an FFT-friendly size, symmetric as Opacus's aligned domain: [-(S/2 - 1) dt, S/2 dt]
    size = _fft_size(2 * half_width / mesh + 2)
    return Domain(-(size // 2 - 1) * mesh, (size // 2) * mesh, size)


class BoundedPRVAccountant(PRVAccountant):
    """Opacus's PRV accountant with its step-count-independent work kept between calls.

    Same PRVs, truncation, discretisation, composition and epsilon bound as
    ``PRVAccountant``; only the domain is chosen on a grid: the width by
    Opacus's rule for the history scaled up to the next power of 4 of its
    steps, the mesh rounded down to a power of two, the number of points
    rounded up to a power of two (fast FFTs). Each makes the truncated mass
    and the discretisation error no larger than Opacus's own choice, so the
    returned upper end of the error interval stays a bound; values agree with
    Opacus's to ~1e-5
    (tests/privacy/test_budget.py). ``grid_steps``: choose the grid for at least that
    many steps (a grid that serves a site's whole run).
    """

    def __init__(self, grid_steps: int = 0) -> None:
        super().__init__()
        self.grid_steps = int(grid_steps)
        self._grid: tuple[float, float, int] | None = None
        self._shift = 0.0
        #: summed magnitude of the composed spectrum's frequencies left out (``_truncated``)
        self._left_out = 0.0

    def get_epsilon(
        self, delta: float, *, eps_error: float = 0.01, delta_error: float | None = None, **kwargs
    ) -> float:
        """Opacus's ``PRVAccountant.get_epsilon``: the upper end of the error interval."""
        if delta <= 0:
            return math.inf
        if delta_error is None:
            delta_error = delta / 1000
        spectrum, roll, domain = self._composed(eps_error, delta_error)
        assert self._grid is not None
        size = domain.size
        # Opacus's domain for its pmf, ``domain.shift_right(self._shift)``: its start and step
        t_min = domain.t_min + self._shift
        dt = (domain.t_max + self._shift - t_min) / (size - 1)
        _check_delta(size, delta, delta_error)
        band = _band_limited_epsilon(
            spectrum, self._left_out, roll, size, t_min, dt, delta, delta_error, eps_error
        )
        if band is not None:
            return band
        pmf = irfft(spectrum, n=size)  # scipy's, as Opacus's composition uses

        def tail(start: int) -> np.ndarray:  # Opacus's pmf (``pmf`` rolled by ``roll``)[start:]
            first, length = (start - roll) % size, size - start
            if first + length <= size:
                return pmf[first : first + length]
            return np.concatenate((pmf[first:], pmf[: first + length - size]))

        grid, shift = self._grid, self._shift
        return _search_epsilon(tail, size, t_min, dt, grid, shift, delta, delta_error, eps_error)

    def _get_domain(self, prvs, num_self_compositions, eps_error, delta_error) -> Domain:
        """Opacus's method, on the grid ``safe_domain`` chooses for these PRVs."""
        pairs = tuple((p.noise_multiplier, p.sample_rate) for p in prvs)
        counts = tuple(num_self_compositions)
        return safe_domain(pairs, counts, self.grid_steps, eps_error, delta_error)

    def _get_dprv(self, eps_error, delta_error):
        """Opacus's discretised, composed PRV (``DiscretePRV``), as ``_composed_pmf`` gives it."""
        pmf, roll, domain = self._composed_pmf(eps_error, delta_error)
        return DiscretePRV(pmf=np.roll(pmf, roll), domain=domain.shift_right(self._shift))

    def _composed_pmf(self, eps_error, delta_error) -> tuple[np.ndarray, int, Domain]:
        """(the composed pmf before Opacus's roll, the roll, the unshifted domain)."""
        spectrum, roll, domain = self._composed(eps_error, delta_error)
        return irfft(spectrum, n=domain.size), roll, domain  # scipy's, as Opacus's

    def _composed(self, eps_error, delta_error) -> tuple[np.ndarray, int, Domain]:
        """(the composed pmf's spectrum, Opacus's roll, the unshifted domain).

        Opacus composes each ``(sigma, q)`` entry as ``irfft(rfft(pmf) ** n)``
        (circular, on the safe domain) and convolves the entries; here every
        entry's spectrum is kept per domain and the whole history is one
        product of powers, with Opacus's index and domain bookkeeping (its pmf is the
        inverse FFT of this spectrum rolled by ``roll``, on the domain shifted right
        by ``self._shift``). A new round on the same domain costs one product; the
        reader takes the inverse FFT (``get_epsilon`` reads only the upper half of the
        pmf) or, once the spectrum is band-limited, none (``_band_limited_epsilon``).
        """
        history = compact(self.history)  # equal (sigma, q) entries merged, as epsilon() does
        pairs = tuple((sigma, q) for sigma, q, _ in history)
        counts = tuple(n for _, _, n in history)
        domain = safe_domain(pairs, counts, self.grid_steps, eps_error, delta_error)
        grid = (domain.t_min, domain.t_max, domain.size)
        spectrum, self._left_out = _composed_spectrum(grid, tuple(history))
        shift = sum(n * _spectrum(sigma, q, *grid)[1] for sigma, q, n in history)
        total = sum(counts)
        self._grid, self._shift = grid, shift
        # index of a sum of `total` grid points on the same grid (Opacus's _compose_fourier)
        roll = (total - 1 + (domain.size // 2 if total % 2 == 0 else 0)) % domain.size
        return spectrum, roll, domain


#: (grid, compacted history) -> (composed spectrum, the magnitude left out of it): the
#: whole spectrum (~2 MB at 2^18 points) or, once band-limited, its band; the latest kept
_COMPOSED: OrderedDict[tuple, tuple[np.ndarray, float]] = OrderedDict()
COMPOSED_KEPT = 12  # a process serving 10 simulated sites keeps each one's latest
#: each kept entry's steps per (sigma, q) and their total (the search for a base reads them)
_COMPOSED_COUNTS: dict[tuple, tuple[dict[tuple[float, float], int], int]] = {}


def _composed_spectrum(grid: tuple, history: tuple[Step, ...]) -> np.ndarray:
    """The product of every entry's spectrum to its step count, kept between rounds.

    A site's next history is its last one plus a round's steps: start from the
    largest kept history on the same grid that it extends and multiply in the
    difference (one cached power per entry, usually one round's steps).
    """
    counts = {(sigma, q): n for sigma, q, n in history}
    base, base_counts, base_total = None, {}, 0
    for key, spec in _COMPOSED.items():
        kept = _COMPOSED_COUNTS.get(key)
        if kept is None:  # an entry put back from outside (tests): count its history
            done = merge_steps(key[1])
            kept = _COMPOSED_COUNTS[key] = (done, sum(done.values()))
        done, total = kept
        if (
            key[0] == grid
            and total > base_total
            and all(counts.get(k, -1) >= n for k, n in done.items())
        ):
            base, base_counts, base_total = spec, done, total
    spectrum, left_out = (np.ones(grid[2] // 2 + 1, dtype=complex), 0.0) if base is None else base
    for (sigma, q), n in counts.items():
        extra = n - base_counts.get((sigma, q), 0)
        if extra:
            spectrum = spectrum * _spectrum_power(sigma, q, grid, extra)[: len(spectrum)]
    spectrum, left_out = _truncated(spectrum, left_out)
    _COMPOSED[(grid, history)] = (spectrum, left_out)
    _COMPOSED.move_to_end((grid, history))
    _COMPOSED_COUNTS[(grid, history)] = (counts, sum(counts.values()))
    while len(_COMPOSED) > COMPOSED_KEPT:
        _COMPOSED_COUNTS.pop(_COMPOSED.popitem(last=False)[0], None)
    return spectrum, left_out


def _truncated(spectrum: np.ndarray, left_out: float) -> tuple[np.ndarray, float]:
    """The spectrum without its highest frequencies whose magnitudes sum to at most
    ``SPECTRAL_TAIL`` (counting what was left out before), and the new total left out.

    A composed spectrum only shrinks as steps are multiplied in (|S_k| <= 1 for a pmf's
    spectrum), so frequencies left out once stay below the bound in every history that
    extends this one; the kept part is zero-padded wherever the whole grid is needed.
    """
    tail = np.cumsum(np.abs(spectrum[::-1]))[::-1]  # tail[k] = sum_{j >= k} |S_j|
    below = np.flatnonzero(tail <= SPECTRAL_TAIL - left_out)
    if not len(below) or below[0] < 2:
        return spectrum, left_out
    band = int(below[0])
    return spectrum[:band].copy(), left_out + float(tail[band])


def _upper_epsilon(
    dprv: DiscretePRV, grid: tuple, shift: float, delta: float, delta_error: float, eps_error: float
) -> float:
    """Opacus's ``DiscretePRV.compute_epsilon``, its upper end, with less work per call
    (``_search_epsilon`` over ``dprv``'s pmf)."""
    domain = dprv.domain
    return _search_epsilon(
        lambda start: dprv.pmf[start:],
        domain.size,
        domain.t_min,
        domain.dt,
        grid,
        shift,
        delta,
        delta_error,
        eps_error,
    )


def _search_epsilon(
    tail: Callable[[int], np.ndarray],
    size: int,
    t0: float,
    dt: float,
    grid: tuple,
    shift: float,
    delta: float,
    delta_error: float,
    eps_error: float,
) -> float:
    """The upper end of Opacus's ``DiscretePRV.compute_epsilon`` for the pmf whose entries
    from ``start`` on are ``tail(start)``, on ``size`` points from ``t0`` (the shifted
    grid) in steps of ``dt``.

    The same quantities: suffix sums d1 = sum_{j>=i} p_j and d2 = sum_{j>=i} p_j e^{-t_j},
    delta(t_i) = d1 - e^{t_i} d2 (non-increasing in t), the first grid point where it
    drops to delta - delta_error found by the same binary search ``np.searchsorted``
    runs, and epsilon = log((d1 - delta') / d2) + eps_error. e^{-t} on the shifted grid
    is the grid's (kept) times e^{-shift}; e^{t_i} is computed only where the search
    looks, instead of over the whole grid.
    """
    if delta <= 0:
        return math.inf
    _check_delta(size, delta, delta_error)
    target = delta - delta_error
    # the suffix sums from the middle of the grid (t ~ 0) on: the same sums, bit for
    # bit, as over the whole grid (both accumulate from the last point); the whole grid
    # only when epsilon lies below that point
    for start in (size // 2, 0):
        p = tail(start)
        d1 = np.cumsum(p[::-1])[::-1]
        weighted = np.multiply(p, _neg_exp_grid(*grid)[start:])
        weighted *= math.exp(-shift)
        d2 = np.cumsum(weighted[::-1])[::-1]
        if start == 0 or math.exp(t0 + start * dt) * d2[0] - d1[0] < -target:
            break
    lo, hi = start, size
    while lo < hi:  # np.searchsorted(ndelta, -target, side="left"), ndelta = e^t d2 - d1
        mid = (lo + hi) // 2
        if math.exp(t0 + mid * dt) * d2[mid - start] - d1[mid - start] < -target:
            lo = mid + 1
        else:
            hi = mid
    if lo <= 0:
        raise RuntimeError("Cannot compute epsilon")
    return float(math.log((d1[lo - start] - target) / d2[lo - start]) + eps_error)


_LONGDOUBLE_EPS = float(np.finfo(np.longdouble).eps)


def _check_delta(size: int, delta: float, delta_error: float) -> None:
    """Opacus's guard: a delta this small drowns in the floating-point error of the sums."""
    if _LONGDOUBLE_EPS * size > delta - delta_error:
        raise ValueError(
            "Floating point errors will dominate for such small values of delta. "
            "Increase delta or reduce domain size."
        )


#: frequencies of the composed pmf whose magnitudes sum to at most this are left out of
#: the band-limited evaluation: every pmf value moves by at most 2/N times it, each suffix
#: sum (and delta(t)) by at most 4 times it, and the search is made that much stricter
SPECTRAL_TAIL = 1e-20
#: the band-limited evaluation is used while its band is at most this fraction of the grid
BAND_FRACTION = 1 / 16
#: the coarse grid's spacing, in grid points (the exact answer is then found among them)
COARSE_SPACING = 32


def _band_limited_epsilon(
    spectrum: np.ndarray,
    left_out: float,
    roll: int,
    size: int,
    t0: float,
    dt: float,
    delta: float,
    delta_error: float,
    eps_error: float,
) -> float | None:
    """Opacus's epsilon (``_search_epsilon``'s) for the pmf ``irfft(spectrum)`` rolled by
    ``roll``, on ``size`` points from ``t0`` in steps of ``dt``, without the inverse FFT;
    None when the spectrum is not band-limited enough (then the FFT path is used).
    ``spectrum`` is a composed spectrum as ``_composed_spectrum`` keeps it: its band (the
    frequencies left out, ``left_out`` in all, cut by ``_truncated``) or the whole of it.

    After a few dozen steps the composed PRV is smooth: its spectrum falls below 1e-30
    within ~100 of the grid's N/2 frequencies. With only frequencies 0..K, the pmf is
    p_j = (1/N) sum_{|k|<=K} A_k w^{jk} (w = e^{2 pi i/N}, A_k = S_k w^{-roll k}), and
    both suffix sums of the search are geometric series in closed form:

    * d1(i) = sum_{j>=i} p_j = (1/N) [A_0 (N - i) + C(i) - C(0)],
      C(i) = sum_{k!=0} A_k w^{ik} / (1 - w^k);
    * e^{t_i} d2(i) = e^{t_i} sum_{j>=i} p_j e^{-t_j} = (1/N) [E(i) - e^{t_i - t_N} E(0)],
      E(i) = sum_k A_k w^{ik} / (1 - e^{-dt} w^k).

    C and E are real trigonometric polynomials of degree K: one inverse FFT of a few
    thousand points gives them on every 32nd grid point, which brackets the first point
    where delta(t_i) = d1 - e^{t_i} d2 drops to delta - delta_error (non-increasing in
    i); the <= 32 points of the bracket are then summed directly. epsilon =
    log((d1 - delta') / d2) + eps_error at that point, as Opacus computes it. The left-out
    frequencies move delta(t) by at most 4 x their summed magnitude (<= SPECTRAL_TAIL):
    the search asks for that much below the target and the final ratio is taken at its
    least favourable end, so the left-out frequencies can only raise the result; rounding
    moves it by ~1e-11 relative, as it moves the FFT path's (the two agree to that,
    ``tests/privacy/test_budget.py``).
    """
    band = len(spectrum)  # frequencies 0..band-1, as ``_truncated`` kept them
    kept = band - 1  # the largest kept frequency K
    if kept >= size // 2:  # the Nyquist frequency is its own conjugate: not this path
        return None
    power = size & -size  # the largest power of two dividing N
    coarse = max(2 ** math.ceil(math.log2(2 * kept + 2)), size // COARSE_SPACING, 8)
    coarse = 2 ** math.ceil(math.log2(coarse))
    if kept < 1 or kept > size * BAND_FRACTION or coarse > power or size % coarse:
        return None
    k = np.arange(band)
    # A_k = S_k w^{-roll k}, the phase reduced mod N in integers (exact)
    a = spectrum[:band] * np.exp(-2j * math.pi * ((roll * k) % size) / size)
    spacing = size // coarse
    kernel, ring = _band_kernels(size, dt, spacing, 2 ** math.ceil(math.log2(band)))
    ce = a * kernel[:, :band]  # rows: c_k = A_k / (1 - w^k) (c_0 = 0), e_k
    # C and E at i = m * spacing (m = 0..coarse-1): w_N^{m spacing k} = w_coarse^{mk}
    padded = np.zeros((2, coarse // 2 + 1), dtype=complex)
    padded[:, :band] = ce
    values = irfft(padded, n=coarse, axis=1) * coarse
    c_at, e_at = values[0], values[1]
    c0, e0 = c_at[0], e_at[0]
    a0 = float(a[0].real)
    target = delta - delta_error
    strict = target - 4 * left_out

    def deltas(i: np.ndarray, c_i: np.ndarray, e_i: np.ndarray) -> np.ndarray:
        d1 = a0 * (size - i) + c_i - c0
        d2t = e_i - np.exp((i - size) * dt) * e0
        return (d1 - d2t) / size

    points, left, decay = _coarse_grid(size, coarse, dt)
    # delta(t_i) = (d1 - e^{t_i} d2) on the coarse grid, as ``deltas`` computes it
    passed = np.flatnonzero(((a0 * left + c_at - c0) - (e_at - decay * e0)) / size <= strict)
    first = int(passed[0]) if len(passed) else coarse
    if first == 0:  # the first grid point already passes: Opacus cannot compute epsilon
        return None
    # the exact first point lies in (points[first - 1], points[first - 1] + spacing]
    base = int(points[first - 1])
    rows = min(spacing, size - 1 - base)
    steps = np.arange(1, rows + 1)
    phase = np.exp(2j * math.pi * ((base * k) % size) / size)
    # C and E at base + 1..base + rows: sums over k of their terms times w^{(base + r) k}
    # (elementwise products and sums, not ``@``: a matrix product goes to the BLAS, whose
    # idle worker threads then spin for tens of milliseconds of CPU time)
    sums = np.multiply(ring[:rows, :band], (ce * phase)[:, None, :]).sum(axis=2).real
    c_i = 2.0 * sums[0] - ce[0, 0].real
    e_i = 2.0 * sums[1] - ce[1, 0].real
    i = base + steps
    passed = np.flatnonzero(deltas(i, c_i, e_i) <= strict)
    if not len(passed):
        return None
    j = int(passed[0])
    lo = int(i[j])
    d1 = (a0 * (size - lo) + c_i[j] - c0) / size
    d2 = (math.exp(-(t0 + lo * dt)) * e_i[j] - math.exp(-(t0 + size * dt)) * e0) / size
    # the left-out frequencies move each p_j by at most 2 left_out / N: d1 (N - lo terms)
    # by at most 2 left_out, d2 by at most 2 left_out / N x sum_{j>=lo} e^{-t_j}
    slack_d1 = 2 * left_out
    slack_d2 = 2 * left_out / size * math.exp(-(t0 + lo * dt)) / -math.expm1(-dt)
    if d2 - slack_d2 <= 0 or d1 + slack_d1 - target <= 0:
        return None
    return float(math.log((d1 + slack_d1 - target) / (d2 - slack_d2)) + eps_error)


@lru_cache(maxsize=8)
def _coarse_grid(size: int, coarse: int, dt: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The coarse grid's points i = m N / coarse, N - i and e^{(i - N) dt}."""
    points = np.arange(coarse) * (size // coarse)
    return points, (size - points).astype(float), np.exp((points - size) * dt)


@lru_cache(maxsize=8)
def _band_kernels(size: int, dt: float, spacing: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """For frequencies k < ``width`` of an N = ``size`` grid: [1 / (1 - w^k) (0 at k = 0),
    1 / (1 - e^{-dt} w^k)] and w^{rk} for r = 1..``spacing`` (w = e^{2 pi i / N}).

    1 - w^k and 1 - e^{-dt} w^k are taken without cancellation (w^k is within 1e-3 of
    1 here): 1 - e^{-dt} cos(theta) = 2 sin^2(theta / 2) - expm1(-dt) cos(theta).
    """
    k = np.arange(width)
    theta = 2 * math.pi * k / size
    half_chord = 2 * np.sin(theta / 2) ** 2
    sin = np.sin(theta)
    kernel = np.zeros((2, width), dtype=complex)
    kernel[0, 1:] = 1.0 / (half_chord[1:] - 1j * sin[1:])
    kernel[1] = 1.0 / (half_chord - math.expm1(-dt) * np.cos(theta) - 1j * math.exp(-dt) * sin)
    ring = np.exp(2j * math.pi * (np.outer(np.arange(1, spacing + 1), k) % size) / size)
    return kernel, ring


@lru_cache(maxsize=16)
def _neg_exp_grid(t_min: float, t_max: float, size: int) -> np.ndarray:
    return np.exp(-np.linspace(t_min, t_max, size))


@lru_cache(maxsize=48)
def _spectrum_power(sigma: float, q: float, grid: tuple, n: int) -> np.ndarray:
    return _spectrum(sigma, q, *grid)[0] ** n


@lru_cache(maxsize=48)
def _spectrum(
    sigma: float, q: float, t_min: float, t_max: float, size: int
) -> tuple[np.ndarray, float]:
    """(rfft of the discretised truncated PRV, its mean-preserving shift) on a grid."""
    dprv = _discrete_prv(sigma, q, t_min, t_max, size)
    return rfft(dprv.pmf), float(dprv.domain.shifts)


@lru_cache(maxsize=256)
def _truncated_mean(sigma: float, q: float, t_min: float, t_max: float) -> float:
    prv = TruncatedPrivacyRandomVariable(PoissonSubsampledGaussianPRV(q, sigma), t_min, t_max)
    return float(prv.mean())


def _discrete_prv(sigma: float, q: float, t_min: float, t_max: float, size: int) -> DiscretePRV:
    """Opacus's ``discretize`` of the truncated PRV, its integral mean cached."""
    domain = Domain(t_min, t_max, size)
    prv = TruncatedPrivacyRandomVariable(PoissonSubsampledGaussianPRV(q, sigma), t_min, t_max)
    ts = domain.ts
    # the cdf at every interval edge once: interval i is [t_i - dt/2, t_i + dt/2]
    edges = np.append(ts - domain.dt / 2, ts[-1] + domain.dt / 2)
    pmf = np.diff(prv.cdf(edges))
    # the discrete mean by numpy's own summation: ``np.dot`` goes to the BLAS, whose worker
    # threads (OpenBLAS's, two on a 2-core machine) then spin for ~50 ms of CPU time
    shift = _truncated_mean(sigma, q, t_min, t_max) - float(np.multiply(ts, pmf).sum())
    if abs(shift) >= domain.dt / 2:
        raise RuntimeError("Discrete mean differs significantly from continuous mean.")
    return DiscretePRV(pmf=pmf, domain=domain.shift_right(shift))


@lru_cache(maxsize=64)
def noise_for_target(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    """Noise multiplier that spends ``target_epsilon`` over ``steps`` steps at rate ``q``."""
    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=require_bound(accountant),
        )
    )


def poisson_rate(n_records: int, batch_size: int) -> float:
    """The per-record Poisson rate Opacus uses for ``n`` records at an expected batch ``B``.

    Opacus sets q = 1 / len(DataLoader) = 1 / ceil(n / B).
    """
    if n_records <= 0:
        raise ValueError("no records to sample from")
    return 1.0 / math.ceil(n_records / batch_size)


def expected_batch_size(n_records: int, batch_size: int) -> int:
    """E[B] = n * q for Opacus's q = 1 / ceil(n / B), in integer arithmetic (>= 1).

    The DP optimizer divides the noisy clipped sum by it; ``int(n * q)`` in
    floating point can be 0 (n = 49, B = 1 gives 0.999...), which made NaN weights.
    """
    if n_records <= 0 or batch_size <= 0:
        raise ValueError(
            f"expected batch size: {n_records} records at batch size {batch_size}; "
            "a DP round needs at least one record and batch-size >= 1"
        )
    expected = n_records // math.ceil(n_records / batch_size)
    if expected < 1:  # pragma: no cover - n // ceil(n / B) >= 1 whenever n, B >= 1
        raise ValueError(
            f"expected batch size {expected} < 1 for {n_records} records; raise batch-size"
        )
    return expected
