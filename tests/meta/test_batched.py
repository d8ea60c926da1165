"""The vectorised adaptation is the sequential SGD loop, episode for episode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmeta.data.tasks.base import Episode
from fedmeta.data.tasks.digits import DigitsFewShot
from fedmeta.data.tasks.sine import Sine
from fedmeta.meta.adaptation import adapt, score, step_size
from fedmeta.meta.batched import adapt_and_score, same_shapes
from fedmeta.meta.methods import Method, draw_episodes, initial_states

DIGITS = DigitsFewShot()


@pytest.mark.parametrize(
    "method", [Method("scratch", "scratch"), Method("meta+proto-ft", "meta", "proto", True)]
)
def test_batched_adaptation_matches_the_loop(method: Method) -> None:
    episodes = draw_episodes(DIGITS, "val", 3, 2, 3, seed=4)
    torch.manual_seed(0)
    init = (DIGITS.build_model(5).state_dict(), 5)
    model, states = initial_states(DIGITS, method, init, episodes, seed=7)
    got = adapt_and_score(model, DIGITS, states, episodes, steps=4, lr=0.3)
    want = []
    for ep, st in zip(episodes, states, strict=True):
        m = DIGITS.build_model(5)
        m.load_state_dict(st)
        adapt(m, DIGITS, ep, 4, 0.3, "cpu")
        want.append(score(m, DIGITS, ep.query_x, ep.query_y, "cpu"))
    assert got == pytest.approx(want, abs=1e-6)


def test_batched_regression_is_the_mse_of_the_loop() -> None:
    task = Sine()
    episodes = draw_episodes(task, "val", 2, 5, 4, seed=1)
    model, states = initial_states(task, Method("scratch", "scratch"), (None, 0), episodes, 3)
    got = adapt_and_score(model, task, states, episodes, steps=3, lr=0.01)
    want = []
    for ep, st in zip(episodes, states, strict=True):
        m = task.build_model(1)
        m.load_state_dict(st)
        want.append(score(adapt(m, task, ep, 3, 0.01, "cpu"), task, ep.query_x, ep.query_y, "cpu"))
    assert got == pytest.approx(want, rel=1e-5)


def test_episodes_of_different_shapes_are_refused() -> None:
    a = Episode(
        np.zeros((5, 1, 8, 8), np.float32),
        np.arange(5),
        np.zeros((5, 1, 8, 8), np.float32),
        np.arange(5),
    )
    b = Episode(np.zeros((10, 1, 8, 8), np.float32), np.arange(10) % 5, a.query_x, a.query_y)
    assert not same_shapes([a, b])
    with pytest.raises(ValueError, match="different shapes"):
        adapt_and_score(DIGITS.build_model(5), DIGITS, [{}, {}], [a, b], steps=1, lr=0.1)


def test_batched_cosine_schedule_matches_the_loop_and_decays() -> None:
    episodes = draw_episodes(DIGITS, "val", 3, 2, 3, seed=4)
    model, states = initial_states(DIGITS, Method("scratch", "scratch"), (None, 0), episodes, 7)
    got = adapt_and_score(model, DIGITS, states, episodes, steps=4, lr=0.3, schedule="cosine")
    want = []
    for ep, st in zip(episodes, states, strict=True):
        m = DIGITS.build_model(5)
        m.load_state_dict(st)
        adapt(m, DIGITS, ep, 4, 0.3, "cpu", "cosine")
        want.append(score(m, DIGITS, ep.query_x, ep.query_y, "cpu"))
    assert got == pytest.approx(want, abs=1e-6)
    rates = [step_size(0.3, t, 4, "cosine") for t in range(4)]
    assert rates[0] == 0.3 and rates == sorted(rates, reverse=True) and rates[-1] > 0
    assert step_size(0.3, 3, 4) == 0.3
    with pytest.raises(ValueError, match="schedule"):
        step_size(0.3, 0, 4, "linear")  # type: ignore[arg-type]
