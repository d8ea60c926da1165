"""The few-shot methods at a new site: prototype classifiers and the per-shot protocol."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmeta.data.tasks.base import Episode
from fedmeta.data.tasks.digits import DigitsFewShot
from fedmeta.meta.adaptation import adapt, initial_model, score
from fedmeta.meta.curve import choose_lr
from fedmeta.meta.methods import Method, draw_episodes, episode_scores, methods_for

TASK = DigitsFewShot()


def _state(seed: int = 0) -> tuple[dict[str, torch.Tensor], int]:
    torch.manual_seed(seed)
    return TASK.build_model(24).state_dict(), 24


def test_methods_cover_the_three_families() -> None:
    names = [m.name for m in methods_for(["transfer", "meta", "fomaml"])]
    assert names[0] == "scratch"
    for base in ("transfer", "meta", "fomaml"):
        assert {base, f"{base}+proto", f"{base}+proto-ft"} <= set(names)
    assert [m.name for m in methods_for(["meta"], kind="regression")] == ["scratch", "meta"]
    proto = next(m for m in methods_for(["meta"]) if m.name == "meta+proto")
    assert not proto.fine_tune and "prototypes" in proto.label


def test_prototype_classifier_takes_no_step_and_knows_its_support_set() -> None:
    # query = support: each image is nearest to its own class mean when classes are one image
    x, y = TASK.eval_episode("test", np.random.default_rng(3), 1, 1).support_x, np.arange(5)
    episode = Episode(x, y, x, y)
    proto = Method("transfer+proto", "transfer", "proto", fine_tune=False)
    scores = episode_scores(TASK, proto, _state(), [episode], steps=20, lr=1.0, seed=0)
    assert scores == [1.0]
    # the zero head of plain transfer is chance (all logits equal: argmax picks class 0)
    plain = episode_scores(
        TASK, Method("transfer", "transfer"), _state(), [episode], steps=0, lr=0.1, seed=0
    )
    assert plain == pytest.approx([0.2])


def test_fine_tuning_is_plain_sgd_from_the_method_head() -> None:
    episodes = draw_episodes(TASK, "val", 3, 2, 4, seed=5)
    method = Method("meta", "meta")
    state = _state(1)
    got = episode_scores(TASK, method, state, episodes, steps=3, lr=0.3, seed=9)
    want = []
    for ep in episodes:
        model = initial_model(TASK, *state, seed=9)
        adapt(model, TASK, ep, 3, 0.3, "cpu")
        want.append(score(model, TASK, ep.query_x, ep.query_y, "cpu"))
    assert got == want


def test_lr_is_chosen_on_validation_and_none_for_a_prototype_classifier() -> None:
    val = draw_episodes(TASK, "val", 4, 1, 3, seed=1)
    lr, best, _ = choose_lr(TASK, Method("scratch", "scratch"), (None, 0), val, [1e-6, 0.3], 5, 0)
    assert lr in (1e-6, 0.3) and 0.0 <= best <= 1.0
    lr, best, _ = choose_lr(
        TASK, Method("meta+proto", "meta", "proto", False), _state(), val, [0.1, 0.3], 5, 0
    )
    assert lr is None and 0.2 <= best <= 1.0


def test_every_method_sees_the_same_episodes() -> None:
    a = draw_episodes(TASK, "test", 3, 5, 2, seed=11)
    b = draw_episodes(TASK, "test", 3, 5, 2, seed=11)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x.support_x, y.support_x) and np.array_equal(x.query_y, y.query_y)
