"""New sites with their own acquisition shift (digits-shifted)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmeta.data.tasks.digits import DigitsFewShot
from fedmeta.data.tasks.shifted import Acquisition, ShiftedDigits, draw_acquisition, render

X = DigitsFewShot().eval_episode("test", np.random.default_rng(0), 5, 5).support_x


def test_identity_acquisition_leaves_images_alone() -> None:
    assert np.array_equal(render(X, Acquisition(), np.random.default_rng(0)), X)


def test_each_factor_moves_the_images_the_way_it_says() -> None:
    rng = np.random.default_rng(0)
    thick = render(X, Acquisition(stroke=1), rng)
    thin = render(X, Acquisition(stroke=-1), rng)
    assert thick.sum() > X.sum() > thin.sum()  # more ink, less ink
    blurred = render(X, Acquisition(blur=1.0), rng)
    assert blurred.max() < X.max() and abs(blurred.mean() - X.mean()) < 0.05
    faded = render(X, Acquisition(contrast=0.5, background=0.2), rng)
    assert faded.min() >= 0.2 - 1e-6 and faded.max() <= 0.6 + 1e-6
    noisy = render(X, Acquisition(noise=0.1), rng)
    assert 0.03 < np.abs(noisy - X).mean() < 0.1


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_any_drawn_site_gives_valid_images(seed: int) -> None:
    rng = np.random.default_rng(seed)
    out = render(X, draw_acquisition(rng), rng)
    assert out.shape == X.shape and out.dtype == np.float32
    assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0


def test_bad_acquisition_is_refused() -> None:
    with pytest.raises(ValueError, match="stroke"):
        Acquisition(stroke=2)
    with pytest.raises(ValueError, match="contrast"):
        Acquisition(contrast=0.0)


def test_shifted_episode_has_the_same_classes_and_one_site_shift() -> None:
    plain = DigitsFewShot().eval_episode("test", np.random.default_rng(4), 2, 3)
    shifted = ShiftedDigits().eval_episode("test", np.random.default_rng(4), 2, 3)
    assert np.array_equal(plain.support_y, shifted.support_y)
    assert np.array_equal(plain.query_y, shifted.query_y)
    assert not np.allclose(plain.support_x, shifted.support_x)
    # training is digits-fewshot's: the same site records, clean
    assert np.array_equal(ShiftedDigits().site_records(0).x, DigitsFewShot().site_records(0).x)
