"""training/metrics.py: accuracy and the expected calibration error, on hand-made cases."""

import numpy as np
import pytest

from model import DigitCNN
from training import metrics


def test_an_empty_drawing_counts_as_wrong():
    blank = np.full((280, 280, 4), (0, 0, 0, 255), dtype=np.uint8)  # opaque black, no ink
    assert metrics.predicted_digits(DigitCNN().eval(), [blank]) == [None]
    report = metrics.accuracy_report([1, 2, None, 4], [1, 2, 3, 5])
    assert report["accuracy"] == 0.5 and report["by_digit"] == {"1": 1, "2": 1, "3": 0, "5": 0}
    assert report["confusions"] == {"3 read as nothing": 1, "5 read as 4": 1}


def test_expected_calibration_error_of_a_hand_made_case():
    # 15 bins, (0, 1/15], (1/15, 2/15], ...: 0.95 in the last (4 images, 3 right: |0.75 - 0.95|),
    # 0.55 in the 9th (2 images, 1 right: |0.5 - 0.55|), weighted by their shares.
    confidences, right = [0.95] * 4 + [0.55] * 2, [True, True, True, False, True, False]
    assert metrics.expected_calibration_error(confidences, right) == pytest.approx(
        4 / 6 * 0.2 + 2 / 6 * 0.05
    )
    # 0.65 and 0.68 fall on either side of 10/15 (one bin of ten would hold both: 0.165).
    assert metrics.expected_calibration_error([0.65, 0.68], [True, False]) == pytest.approx(
        0.5 * 0.35 + 0.5 * 0.68
    )
    # A bin holds its upper edge: 10/15 in (9/15, 10/15], 0.7 in the next.
    assert metrics.expected_calibration_error([10 / 15, 0.7], [True, False]) == pytest.approx(
        0.5 * (1 - 10 / 15) + 0.5 * 0.7
    )
    assert metrics.expected_calibration_error([1.0, 0.5, 0.5], [True, True, False]) == 0
    report = metrics.accuracy_report([1, 2], [1, 3], confidences=[0.9, 0.6])
    assert report["ece"] == pytest.approx(0.5 * 0.1 + 0.5 * 0.6)
    assert "ece" not in metrics.accuracy_report([1, 2], [1, 3])


def test_calibration_error_is_the_gap_between_confidence_and_accuracy():
    sure = [0.9] * 10  # 90% sure every time
    right = [True] * 9 + [False]  # and right 9 times in 10: calibrated
    assert metrics.expected_calibration_error(sure, right) == pytest.approx(0, abs=1e-6)
    assert metrics.expected_calibration_error(sure, [True] * 10) == pytest.approx(0.1)
