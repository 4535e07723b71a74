"""One rounding rule for the counts taken as a share of a whole: the warm-up's optimiser steps (a share of an
epoch's steps) and --val_split's held-out images (a share of a class), both rounded half up."""

import pytest

import dataset
import train_eval
import utils


@pytest.mark.parametrize("value, expected", [(0.5, 1), (1.5, 2), (2.5, 3), (2.4999, 2), (0.0, 0), (3.0, 3)])
def test_halves_round_up(value, expected):
    assert utils.round_half_up(value) == expected


@pytest.mark.parametrize("share, whole, expected", [
    (0.5, 5, 3),  # 2.5: Python's round gives 2 (half to even)
    (0.5, 1, 1),  # 0.5: round gives 0
    (2.5, 1, 3),
    (1.5, 1, 2),  # half to even and half up agree here
    (0.1, 25, 3),
    (0.3, 5, 2),  # 1.5
])
def test_the_warmup_and_the_held_out_count_round_halves_up_alike(share, whole, expected):
    assert train_eval.warmup_steps_of(share, whole) == expected
    assert dataset.held_out_count(share, whole) == expected


def test_a_warmup_that_is_on_lasts_at_least_one_step():
    assert train_eval.warmup_steps_of(0.01, 5) == 1
    assert train_eval.warmup_steps_of(0.0, 5) == 0
