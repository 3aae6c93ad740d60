"""Intervals for `evaluate`'s numbers: win rates (a proportion over prompts) and paired score differences.

A win rate is the share of prompts whose round-k image beats round 0 (a tie counts one half; with several
seeds per prompt, a prompt's outcome is the mean over its seeds, so the prompt stays the unit). Its 95 %
interval is, by default, the Wilson score interval (Wilson 1927), which never collapses to a point: 0 wins
of 4 gives [0, 0.49], not the [0, 0] a bootstrap of four zeros gives. The exact Clopper-Pearson interval
(Clopper & Pearson 1934; wider, guaranteed coverage) is available: its bounds are Beta quantiles,
lower = B(a/2; k, n - k + 1), upper = B(1 - a/2; k + 1, n - k), with lower = 0 at k = 0 and upper = 1 at
k = n. Both take k = n * win rate, which is not a whole number when there are ties or several seeds (the
formulas extend continuously; a tie counted half is the usual convention). The percentile bootstrap over
prompts is kept as a third method for comparison with older summaries.

The mean score difference (round k minus round 0, or run A minus run B) gets a paired bootstrap interval:
the prompts are resampled with replacement (BOOTSTRAP_RESAMPLES times, fixed seed) and the 2.5 and 97.5
percentiles of the mean difference are reported.

Everything here is plain numpy and math (no scipy): the regularized incomplete beta function is evaluated
with its continued fraction (modified Lentz), and its inverse by bisection.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

from img_core.errors import InvalidInputError

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
INTERVAL_METHODS = ("wilson", "clopper-pearson", "bootstrap")
DEFAULT_INTERVAL_METHOD = "wilson"
_CONTINUED_FRACTION_STEPS = 300
_CONTINUED_FRACTION_TOLERANCE = 1e-15
_BISECTION_STEPS = 100  # halves [0, 1] down to 2^-100: far below float precision


def check_interval_method(method: str) -> str:
    if method not in INTERVAL_METHODS:
        raise InvalidInputError(f"interval method must be one of {', '.join(INTERVAL_METHODS)}, got {method!r}")
    return method


def wilson_interval(successes: float, n: int, confidence: float = CONFIDENCE) -> list[float]:
    """Wilson score interval of a proportion successes / n: (p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)."""
    if n <= 0:
        raise InvalidInputError("an interval needs at least one prompt")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(max(p * (1 - p) / n + z * z / (4 * n * n), 0.0)) / denominator
    low = 0.0 if successes <= 0 else max(0.0, centre - half)  # exactly 0 (and 1), not 1e-17 of rounding
    high = 1.0 if successes >= n else min(1.0, centre + half)
    return [low, high]


def clopper_pearson_interval(successes: float, n: int, confidence: float = CONFIDENCE) -> list[float]:
    """Exact (Clopper-Pearson) interval: Beta quantiles, see the module docstring."""
    if n <= 0:
        raise InvalidInputError("an interval needs at least one prompt")
    alpha = 1 - confidence
    low = 0.0 if successes <= 0 else beta_quantile(alpha / 2, successes, n - successes + 1)
    high = 1.0 if successes >= n else beta_quantile(1 - alpha / 2, successes + 1, n - successes)
    return [low, high]


def bootstrap_interval(outcomes: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                       confidence: float = CONFIDENCE) -> list[float]:
    """Percentile interval of the mean of `outcomes` (P,) over resamples of the prompts with replacement.
    For a paired difference pass the per-prompt differences: that is the paired bootstrap."""
    outcomes = np.asarray(outcomes, dtype=np.float64)
    if outcomes.size == 0:
        raise InvalidInputError("an interval needs at least one prompt")
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, len(outcomes), size=(resamples, len(outcomes)))  # (R, P)
    means = outcomes[indices].mean(axis=1)  # (R,)
    tail = 100 * (1 - confidence) / 2
    return [float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))]


def win_rate_interval(outcomes: np.ndarray, method: str = DEFAULT_INTERVAL_METHOD) -> list[float]:
    """95 % interval of the win rate from per-prompt outcomes (P,) in [0, 1] (1 win, 0.5 tie, 0 loss)."""
    outcomes = np.asarray(outcomes, dtype=np.float64)
    check_interval_method(method)
    if method == "bootstrap":
        return bootstrap_interval(outcomes)
    n = len(outcomes)
    successes = float(outcomes.sum())
    return wilson_interval(successes, n) if method == "wilson" else clopper_pearson_interval(successes, n)


def win_outcomes(scores: np.ndarray, base: np.ndarray) -> np.ndarray:
    """Per-prompt outcome of `scores` against `base`, both (P, S) (S seeds): the mean over seeds of
    1 (higher), 0.5 (equal) or 0 (lower). Returns (P,)."""
    return ((scores > base) + 0.5 * (scores == base)).mean(axis=1)


# --------------------------------------------------------------------------- the incomplete beta function


def regularized_incomplete_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b) for a, b > 0 and x in [0, 1], from its continued fraction (the symmetric form where it
    converges fast: I_x(a, b) = 1 - I_{1-x}(b, a))."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x <= (a + 1) / (a + b + 2):  # then 1 - x > (b + 1) / (a + b + 2): no ping-pong
        return math.exp(log_front) * _beta_continued_fraction(x, a, b) / a
    return 1.0 - regularized_incomplete_beta(1.0 - x, b, a)


def _beta_continued_fraction(x: float, a: float, b: float) -> float:
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, _CONTINUED_FRACTION_STEPS + 1):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            step = c * d
            result *= step
        if abs(step - 1.0) < _CONTINUED_FRACTION_TOLERANCE:
            break
    return result


def beta_quantile(q: float, a: float, b: float) -> float:
    """The x with I_x(a, b) = q (bisection: I_x is increasing in x)."""
    low, high = 0.0, 1.0
    for _ in range(_BISECTION_STEPS):
        middle = (low + high) / 2
        if regularized_incomplete_beta(middle, a, b) < q:
            low = middle
        else:
            high = middle
    return (low + high) / 2
