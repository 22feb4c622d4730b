"""model.py: loading weights safely and predicting."""

import pytest
import torch

import model
from model import DigitCNN, ModelLoadError, load_model, predict, predict_batch


class _RunsCode:
    """Unpickling this object creates a file: what a malicious model file could do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "model.pth"
    torch.save(DigitCNN().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def net(model_file):
    return load_model(model_file)


def test_load_model_returns_the_saved_weights_in_eval_mode(net, model_file):
    assert not net.training
    saved = torch.load(model_file, weights_only=True)
    for name, tensor in net.state_dict().items():
        assert torch.equal(tensor, saved[name]), name


def test_model_path_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MODEL_PATH", str(tmp_path / "other.pth"))
    assert model.model_path() == tmp_path / "other.pth"
    monkeypatch.delenv("MODEL_PATH")
    assert model.model_path() == model.DEFAULT_MODEL_PATH


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, r"No model file at .*python train\.py"),
        ("truncated", "corrupt"),
        (b"this is not a model" * 100, "corrupt"),
        (torch.nn.Linear(784, 10).state_dict(), "does not match"),
        (torch.zeros(3), "not a state_dict"),
    ],
    ids=["missing", "truncated", "garbage", "other-network", "tensor"],
)
def test_a_bad_model_file_is_a_clear_error(tmp_path, model_file, content, message):
    path = tmp_path / "model.pth"
    if content == "truncated":
        path.write_bytes(model_file.read_bytes()[:20_000])
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(ModelLoadError, match=message):
        load_model(path)


def test_a_file_that_runs_code_is_refused_not_executed(tmp_path):
    """weights_only=True: unpickling arbitrary objects could run anything."""
    path, ran = tmp_path / "model.pth", tmp_path / "code-ran"
    torch.save({"weight": _RunsCode(ran)}, path)
    with pytest.raises(ModelLoadError, match="corrupt"):
        load_model(path)
    assert not ran.exists()


def test_predict_gives_the_digit_of_the_models_own_softmax(net):
    torch.manual_seed(1)
    batch = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        expected = torch.softmax(net(batch), dim=1)
    together = predict_batch(net, batch)
    for i, prediction in enumerate(together):
        assert prediction.probabilities == pytest.approx(expected[i].tolist(), rel=1e-5)
        assert prediction.digit == int(expected[i].argmax())
        assert prediction.confidence == max(prediction.probabilities)
        alone = predict(net, batch[i : i + 1])
        assert alone.digit == prediction.digit
        assert alone.confidence == pytest.approx(prediction.confidence, rel=1e-5)


@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 3, 28, 28), (1, 1, 32, 32), (2, 1, 28, 28)])
def test_predict_rejects_wrong_shapes(net, shape):
    with pytest.raises(ValueError, match="one image|Expected a batch"):
        predict(net, torch.zeros(shape))


def test_predict_builds_no_autograd_graph(net):
    outputs = []
    hook = net.register_forward_hook(lambda module, args, output: outputs.append(output))
    try:
        predict(net, torch.randn(1, 1, 28, 28))
    finally:
        hook.remove()
    assert [output.requires_grad for output in outputs] == [False]


def test_shipped_model_loads_and_is_small():
    assert model.DEFAULT_MODEL_PATH.stat().st_size < 5 * 1024 * 1024
    load_model()
