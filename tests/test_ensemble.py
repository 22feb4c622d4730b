"""lab/ensemble.py: joining model files into one ensemble (the calibration error it reports is
training.metrics': tests/test_training_metrics.py)."""

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
