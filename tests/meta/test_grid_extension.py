"""A kept validation grid extended by new rates scores only those, and chooses as a full one."""

from __future__ import annotations

import inspect

import torch

from fedmeta.data.tasks.digits import DigitsFewShot
from fedmeta.meta.curve import choose_lr
from fedmeta.meta.methods import Method, draw_episodes
from fedmeta.meta.protocol import LR_GRID, grid_text

DIGITS = DigitsFewShot()
TRANSFER = Method("transfer", "transfer", fine_tune=True)


def _init() -> tuple[dict, int]:
    torch.manual_seed(0)
    return DIGITS.build_model(5).state_dict(), 5


def test_extending_a_grid_scores_only_the_new_rate_and_matches_the_full_grid() -> None:
    episodes = draw_episodes(DIGITS, "val", 4, 2, 3, seed=4)
    init = _init()
    full = choose_lr(DIGITS, TRANSFER, init, episodes, [0.01, 0.1, 0.5], 3, 0, "cosine")
    kept = {lr: full[2][lr] for lr in (0.1, 0.5)}
    extended = choose_lr(
        DIGITS, TRANSFER, init, episodes, [0.01, 0.1, 0.5], 3, 0, "cosine", known=kept
    )
    assert extended[0] == full[0]
    assert extended[2] == full[2]  # each rate's adaptation is its own: exactly the same
    assert list(extended[2]) == [0.01, 0.1, 0.5]  # in the grid's order
    # the kept rates are taken as given, not scored again: a kept score decides the choice
    rigged = {0.1: full[2][0.1], 0.5: (2.0, 0.0)}
    chosen = choose_lr(
        DIGITS, TRANSFER, init, episodes, [0.01, 0.1, 0.5], 3, 0, "cosine", known=rigged
    )
    assert chosen[0] == 0.5 and chosen[2][0.5] == (2.0, 0.0)


def test_the_grid_is_one_constant_for_the_command_and_the_benchmark() -> None:
    from fedmeta import cli

    assert LR_GRID == (0.01, 0.03, 0.1, 0.3, 0.5)
    assert grid_text() == "0.01,0.03,0.1,0.3,0.5"
    default = inspect.signature(cli.evaluate).parameters["lr_grid"].default
    assert default == grid_text()
