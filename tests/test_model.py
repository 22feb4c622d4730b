"""model.py: loading weights safely and predicting."""

import math

import pytest
import torch

import model
from model import DigitCNN, ModelLoadError, Prediction, load_model, predict, predict_batch


@pytest.fixture
def model_file(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "model.pth"
    torch.save(DigitCNN().state_dict(), path)
    return path


def test_load_model_returns_the_saved_weights_in_eval_mode(model_file):
    loaded = load_model(model_file)
    assert isinstance(loaded, DigitCNN)
    assert not loaded.training
    saved = torch.load(model_file, weights_only=True)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, saved[name]), name


def test_missing_file_says_how_to_train_one(tmp_path):
    with pytest.raises(ModelLoadError, match=r"No model file at .*python train\.py"):
        load_model(tmp_path / "nope.pth")


def test_model_path_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MODEL_PATH", str(tmp_path / "other.pth"))
    assert model.model_path() == tmp_path / "other.pth"
    monkeypatch.delenv("MODEL_PATH")
    assert model.model_path() == model.DEFAULT_MODEL_PATH


def test_truncated_file_is_a_clear_error(model_file):
    data = model_file.read_bytes()
    model_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="corrupt"):
        load_model(model_file)


def test_garbage_file_is_a_clear_error(tmp_path):
    path = tmp_path / "model.pth"
    path.write_bytes(b"this is not a model" * 100)
    with pytest.raises(ModelLoadError, match="corrupt"):
        load_model(path)


def test_wrong_architecture_is_a_clear_error(tmp_path):
    path = tmp_path / "model.pth"
    torch.save(torch.nn.Linear(784, 10).state_dict(), path)
    with pytest.raises(ModelLoadError, match="does not match"):
        load_model(path)


def test_a_pickled_object_is_refused_not_executed(tmp_path):
    """weights_only=True: a file holding arbitrary Python objects must not load."""
    path = tmp_path / "model.pth"
    torch.save({"model": DigitCNN()}, path)  # a whole module, not a state_dict
    with pytest.raises(ModelLoadError):
        load_model(path)


def test_a_tensor_instead_of_a_state_dict_is_refused(tmp_path):
    path = tmp_path / "model.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(ModelLoadError, match="not a state_dict"):
        load_model(path)


def test_predict_gives_digit_confidence_and_probabilities(model_file):
    net = load_model(model_file)
    torch.manual_seed(1)
    prediction = predict(net, torch.randn(1, 1, 28, 28))
    assert isinstance(prediction, Prediction)
    assert len(prediction.probabilities) == 10
    assert math.isclose(sum(prediction.probabilities), 1.0, abs_tol=1e-5)
    assert all(0.0 <= p <= 1.0 for p in prediction.probabilities)
    best = max(range(10), key=lambda d: prediction.probabilities[d])
    assert prediction.digit == best
    assert prediction.confidence == prediction.probabilities[best]


def test_confidence_is_the_models_own_softmax(model_file):
    net = load_model(model_file)
    batch = torch.randn(1, 1, 28, 28)
    with torch.no_grad():
        expected = torch.softmax(net(batch), dim=1)[0]
    prediction = predict(net, batch)
    assert prediction.confidence == pytest.approx(float(expected.max()), rel=1e-6)


def test_predict_batch_matches_one_by_one(model_file):
    net = load_model(model_file)
    batch = torch.randn(5, 1, 28, 28)
    together = predict_batch(net, batch)
    alone = [predict(net, batch[i : i + 1]) for i in range(5)]
    assert [p.digit for p in together] == [p.digit for p in alone]
    for a, b in zip(together, alone, strict=True):
        assert a.confidence == pytest.approx(b.confidence, rel=1e-5)


@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 3, 28, 28), (1, 1, 32, 32), (2, 1, 28, 28)])
def test_predict_rejects_wrong_shapes(model_file, shape):
    with pytest.raises(ValueError, match="one image|Expected a batch"):
        predict(load_model(model_file), torch.zeros(shape))


def test_predict_does_not_track_gradients(model_file):
    net = load_model(model_file)
    batch = torch.randn(1, 1, 28, 28, requires_grad=True)
    predict(net, batch)
    assert batch.grad is None
    assert all(p.grad is None for p in net.parameters())


def test_shipped_model_loads_and_is_small():
    assert model.DEFAULT_MODEL_PATH.is_file(), "models/model.pth must be committed"
    assert model.DEFAULT_MODEL_PATH.stat().st_size < 5 * 1024 * 1024
    load_model()
