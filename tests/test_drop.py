"""The relative drop against full precision and the seed study's bands."""

import pytest

from dllm_studio.eval.drop import accuracy_drop, band, relative_drop


def test_relative_drop_for_accuracy_and_for_a_loss():
    assert relative_drop(0.80, 0.76) == pytest.approx(0.05)
    assert relative_drop(0.80, 0.84) == pytest.approx(-0.05)  # a gain is a negative drop
    assert relative_drop(5.0, 5.1, lower_is_better=True) == pytest.approx(0.02)  # NLL rose: worse
    assert relative_drop(0.5, 0.5) == 0.0
    assert relative_drop(0.0, 0.2) is None  # undefined against a zero score


@pytest.mark.parametrize("drop, name", [(-0.3, "negligible"), (0.0, "negligible"), (0.01, "negligible"),
                                        (0.02, "moderate"), (0.04, "moderate"), (0.041, "significant")])
def test_bands(drop, name):
    assert band(drop) == name


# ---- intervals and paired tests (dllm_studio.eval.stats) -------------------------------------------

def test_wilson_interval_by_hand():
    from dllm_studio.eval.stats import wilson

    # 4/5, z = 1.96: centre (0.8 + z²/10) / (1 + z²/5) = 0.6697, half-width z·sqrt(0.032 + z²/100) / (1 + z²/5) = 0.2941
    assert wilson(4, 5) == pytest.approx((0.3755, 0.9638), abs=1e-4)
    assert wilson(5, 5) == pytest.approx((0.5655, 1.0), abs=1e-4)  # 1 - 0.4345: no collapse to a point at 100 %
    assert wilson(0, 5)[0] == 0.0 and wilson(0, 5)[1] == pytest.approx(0.4345, abs=1e-4)


def test_exact_mcnemar_by_hand():
    from dllm_studio.eval.stats import binomial_two_sided, mcnemar_exact

    assert mcnemar_exact(1, 0) == 1.0  # one flipped item: 2 · 1/2, capped at 1
    assert mcnemar_exact(10, 0) == pytest.approx(2 / 2**10)  # 0.00195
    assert mcnemar_exact(0, 0) == 1.0  # nothing differs: no evidence of a difference
    assert mcnemar_exact(6, 1) == pytest.approx(2 * (1 + 7) / 2**7)  # 0.125
    assert binomial_two_sided(1, 7) == mcnemar_exact(1, 6)  # symmetric in b and c


def test_newcombe_paired_interval_matches_the_published_example():
    from dllm_studio.eval.stats import paired_difference_interval

    # Cavo et al. 2012 as worked in Fagerland, Lydersen & Laake, "Statistical Analysis of Contingency
    # Tables" (2017), ch. 8: table (59, 6 / 16, 80), difference -0.0621, Newcombe 95 % CI -0.1186 to -0.0046.
    assert paired_difference_interval(59, 6, 16, 80) == pytest.approx((-0.1186, -0.0046), abs=1e-4)
    low, high = paired_difference_interval(4, 0, 0, 1)  # nothing differs: the interval straddles 0
    assert low < 0 < high and low == pytest.approx(-high)


def test_one_flip_in_five_is_not_significant():
    from dllm_studio.eval.drop import accuracy_drop

    stats = accuracy_drop([True] * 5, [True] * 4 + [False])
    assert stats.drop == pytest.approx(0.2) and stats.p_value == 1.0
    assert stats.band is None and stats.verdict == "not significant at n = 5"
    assert stats.q_interval == pytest.approx((0.3755, 0.9638), abs=1e-4)
    low, high = stats.drop_interval  # the difference interval over the FP accuracy (1.0 here)
    assert low < 0 < stats.drop < high


def test_ten_flips_in_twenty_are_significant():
    from dllm_studio.eval.drop import accuracy_drop

    stats = accuracy_drop([True] * 20, [False] * 10 + [True] * 10)
    assert stats.p_value == pytest.approx(0.001953125)
    assert stats.drop == pytest.approx(0.5) and stats.band == stats.verdict == "significant"
    assert 0 < stats.drop_interval[0] < 0.5 < stats.drop_interval[1]


def test_nll_drop_uses_a_sign_test_and_gives_no_interval():
    from dllm_studio.eval.drop import nll_drop

    stats = nll_drop([1.0, 2.0, 3.0], [1.1, 2.1, 3.1])  # all three worse: p = 2 / 2**3
    assert stats.p_value == pytest.approx(0.25) and stats.verdict == "not significant at n = 3"
    assert stats.drop == pytest.approx(0.3 / 6) and stats.drop_interval is None and stats.fp_interval is None
    six = nll_drop([1.0] * 6, [1.5] * 6)  # six of six worse: p = 2 / 64
    assert six.p_value == pytest.approx(0.03125) and six.band == "significant"


def test_both_models_scoring_nothing_is_no_drop_without_an_interval():
    stats = accuracy_drop([False] * 3, [False] * 3)  # a tiny random model: no answer right on either side
    assert (stats.drop, stats.drop_interval, stats.p_value, stats.verdict) == (0.0, None, 1.0, "not significant at n = 3")
