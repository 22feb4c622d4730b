"""lab/ensemble.py: joining model files into one ensemble, and its calibration error."""

import pytest
import torch

import model
from lab import ensemble


def test_joined_files_answer_the_mean_of_every_members_probabilities(tmp_path):
    torch.manual_seed(0)
    single, pair = model.ConvNet().eval(), model.DigitCNN(members=2).eval()
    torch.save(single.state_dict(), tmp_path / "single.pth")  # a file from before the ensemble
    torch.save(pair.state_dict(), tmp_path / "pair.pth")
    torch.save(ensemble.join([tmp_path / "single.pth", tmp_path / "pair.pth"]), tmp_path / "j.pth")
    joined = model.load_model(tmp_path / "j.pth")
    assert len(joined.members) == 3
    batch = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        nets = [single, *pair.members]
        expected = torch.stack([torch.softmax(net(batch), 1) for net in nets]).mean(0)
    predicted = model.predict_batch(joined, batch)
    for prediction, row in zip(predicted, expected, strict=True):
        assert prediction.probabilities == pytest.approx(row.tolist(), abs=1e-6)


def test_calibration_error_is_the_gap_between_confidence_and_accuracy():
    sure = torch.tensor([[0.9, 0.1]] * 10)  # 90% sure every time
    labels = torch.tensor([0] * 9 + [1])  # and right 9 times in 10: calibrated
    assert ensemble.expected_calibration_error(sure, labels) == pytest.approx(0, abs=1e-6)
    assert ensemble.expected_calibration_error(sure, torch.tensor([0] * 10)) == pytest.approx(0.1)
