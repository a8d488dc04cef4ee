"""The relative drop against full precision and the seed study's bands."""

import pytest

from dllm_studio.eval.drop import band, relative_drop


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
