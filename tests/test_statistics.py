"""Win-rate and difference intervals (img_core.evaluation.statistics) against known published values."""

import math

import numpy as np
import pytest

from img_core.errors import InvalidInputError
from img_core.evaluation.statistics import (
    beta_quantile,
    bootstrap_interval,
    clopper_pearson_interval,
    regularized_incomplete_beta,
    wilson_interval,
    win_rate_interval,
)


def test_clopper_pearson_matches_known_values():
    # 0 of 4: the upper bound solves (1 - p)^4 = 0.025, i.e. 1 - 0.025 ** (1 / 4) = 0.6024
    assert clopper_pearson_interval(0, 4) == pytest.approx([0.0, 1 - 0.025 ** 0.25], abs=1e-9)
    assert clopper_pearson_interval(0, 4)[1] == pytest.approx(0.6024, abs=1e-4)
    assert clopper_pearson_interval(4, 4) == pytest.approx([0.025 ** 0.25, 1.0], abs=1e-9)
    # 3 of 10 (a textbook value): [0.0667, 0.6525]
    assert clopper_pearson_interval(3, 10) == pytest.approx([0.0667, 0.6525], abs=1e-4)


def test_wilson_matches_known_values():
    assert wilson_interval(0, 4) == pytest.approx([0.0, 0.4899], abs=1e-4)
    assert wilson_interval(3, 10) == pytest.approx([0.1078, 0.6032], abs=1e-4)
    assert wilson_interval(50, 100) == pytest.approx([0.4038, 0.5962], abs=1e-4)


def test_incomplete_beta_and_its_inverse():
    # I_x(a, b) with whole a, b is a binomial tail: I_0.3(2, 5) = P(Bin(6, 0.3) >= 2)
    tail = 1 - 0.7 ** 6 - 6 * 0.3 * 0.7 ** 5
    assert regularized_incomplete_beta(0.3, 2, 5) == pytest.approx(tail, abs=1e-12)
    assert regularized_incomplete_beta(0.5, 3.5, 3.5) == pytest.approx(0.5, abs=1e-12)  # symmetric
    assert beta_quantile(tail, 2, 5) == pytest.approx(0.3, abs=1e-12)


@pytest.mark.parametrize("method", ["wilson", "clopper-pearson"])
def test_five_prompts_never_give_a_narrow_interval(method):
    for wins in range(6):
        outcomes = np.array([1.0] * wins + [0.0] * (5 - wins))
        low, high = win_rate_interval(outcomes, method)
        assert high - low >= 0.2, (wins, low, high)
        assert 0.0 <= low <= wins / 5 <= high <= 1.0
    # the bootstrap of five equal outcomes collapses to a point: why it is not the default
    assert bootstrap_interval(np.zeros(5)) == [0.0, 0.0]


def test_ties_count_one_half_and_bad_input_is_refused():
    outcomes = np.array([1.0, 0.5, 0.0, 0.5])
    assert win_rate_interval(outcomes, "wilson") == pytest.approx(wilson_interval(2.0, 4))
    low, high = win_rate_interval(outcomes, "clopper-pearson")
    assert low < 0.5 < high and not math.isnan(low)
    with pytest.raises(InvalidInputError, match="interval method"):
        win_rate_interval(outcomes, "normal")
    with pytest.raises(InvalidInputError, match="at least one prompt"):
        wilson_interval(0, 0)


def test_a_mean_plot_labels_its_axis_with_the_ticks_of_its_own_scale():
    """The plot draws the ticks its scale was made from: recomputing them from the rounded ends could pick a
    coarser step in floating point and leave an axis with two labels."""
    import re

    from img_core.evaluation.evaluate import _mean_plot

    entries = [  # the first one gave two labels when the ticks were recomputed from the scale's ends
        {"mean": [-19.9117, -19.8691, -19.9105], "mean_difference_ci95": [None, [-0.02, 0.0317], [-0.0235, 0.0058]]},
        {"mean": [16.4462, 10.9882, 11.3674], "mean_difference_ci95": [None, [-6.268, -4.525], [-5.804, -4.361]]},
    ]
    for entry in entries:
        labels = re.findall(r'class="y-tick"[^>]*>([^<]+)<', _mean_plot("score", entry))
        assert len(labels) >= 3, (entry, labels)
