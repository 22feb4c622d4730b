"""model.py: loading weights safely and predicting."""

import pytest
import torch

import model
import utils
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


# --- the ensemble: K members in one module ----------------------------------------------------


@pytest.fixture(scope="module")
def ensemble_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ensemble") / "model.pth"
    torch.save(DigitCNN(members=3).state_dict(), path)
    return path


def test_an_ensemble_file_loads_with_its_members_and_weights(ensemble_file):
    net = load_model(ensemble_file)
    assert len(net.members) == 3 and not net.training
    saved = torch.load(ensemble_file, weights_only=True)
    assert net.state_dict().keys() == saved.keys()
    assert all(torch.equal(tensor, saved[name]) for name, tensor in net.state_dict().items())
    first, second = (net.members[i].features[0][0].weight for i in (0, 1))
    assert not torch.equal(first, second)  # each member from its own random start


def test_a_single_network_file_from_before_the_ensemble_loads_as_one_member(tmp_path):
    """models/model.pth, the registry's versions and --init files have keys features.*,
    classifier.*: one member, predicting exactly as that network does."""
    torch.manual_seed(2)
    single = model.ConvNet().eval()
    path = tmp_path / "model.pth"
    torch.save(single.state_dict(), path)
    net = load_model(path)
    assert len(net.members) == 1
    batch = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(net(batch), single(batch))


def test_an_ensemble_predicts_one_answer_the_mean_of_its_members_probabilities(ensemble_file):
    net = load_model(ensemble_file)
    torch.manual_seed(3)
    batch = torch.randn(1, 1, 28, 28) * 2
    prediction = predict(net, batch)
    with torch.no_grad():
        members = torch.stack([torch.softmax(member(batch), 1)[0] for member in net.members])
    assert sum(prediction.probabilities) == pytest.approx(1, abs=1e-5)
    assert prediction.probabilities == pytest.approx(members.mean(0).tolist(), abs=1e-6)
    assert prediction.digit == int(members.mean(0).argmax())
    assert prediction.confidence == max(prediction.probabilities)


def _without_member(state, index):
    return {k: v for k, v in state.items() if not k.startswith(f"members.{index}.")}


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda s: _without_member(s, 1), r"incomplete: .* 3 members, and member 1 is missing"),
        (lambda s: _without_member(s, 2), r"incomplete: .* 3 members, and member 2 is missing"),
        (
            lambda s: {k: v for k, v in s.items() if k != "members.2.classifier.2.bias"},
            r"incomplete: member 2 of 3 lacks classifier\.2\.bias",
        ),
        (
            lambda s: {**s, "members.1.features.0.0.weight": torch.zeros(24, 1, 3, 3)},
            r"(?s)does not match.*size mismatch.*members\.1\.features\.0\.0\.weight",
        ),
        (
            lambda s: {**s, "members.0.classifier.2.weight": torch.full((10, 864), float("nan"))},
            r"corrupt: members\.0\.classifier\.2\.weight holds NaN",
        ),
        (lambda s: {**s, "members.1.features.0.1.weight": "weights"}, r"corrupt: .* a str"),
        (lambda s: {**s, "member_count": torch.tensor(40)}, r"corrupt: it claims 40 members"),
        (lambda s: {**s, "member_count": torch.tensor(2)}, r"unexpected keys members\.2\."),
        (lambda s: {k: v for k, v in s.items() if k != "member_count"}, r"no member_count"),
        (lambda s: {**s, "members.0.extra.weight": torch.zeros(3)}, r"does not match.*extra"),
    ],
    ids=["member-missing", "last-member-missing", "part-missing", "wrong-shape", "nan",
         "not-a-tensor", "too-many", "count-too-small", "no-count", "unknown-key"],
)  # fmt: skip
def test_a_damaged_ensemble_file_is_a_clear_error_naming_the_file(
    tmp_path, ensemble_file, damage, message
):
    assert_damage_named(tmp_path, ensemble_file, damage, message)


def assert_damage_named(tmp_path, intact, damage, message) -> None:
    """The file *intact* saved again through *damage* fails to load with *message*, naming it."""
    path = tmp_path / "damaged.pth"
    torch.save(damage(torch.load(intact, weights_only=True)), path)
    with pytest.raises(ModelLoadError, match=message) as raised:
        load_model(path)
    assert str(path) in str(raised.value)


# --- the model of the strokes: a second model, in the same file -----------------------------------


@pytest.fixture(scope="module")
def paired_file(tmp_path_factory):
    torch.manual_seed(4)
    path = tmp_path_factory.mktemp("paired") / "model.pth"
    torch.save(DigitCNN(members=2, trajectory=True).state_dict(), path)
    return path


def _trajectory(seed: int, count: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(count, utils.TRAJECTORY_FEATURES, utils.TRAJECTORY_POINTS)


def test_a_file_with_the_model_of_the_strokes_loads_it_with_weights_only(paired_file, monkeypatch):
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k) or real_load(*a, **k))
    net = load_model(paired_file)
    assert loads == [{"map_location": "cpu", "weights_only": True}]
    assert isinstance(net.trajectory, model.TrajectoryNet) and not net.trajectory.training
    saved = real_load(paired_file, weights_only=True)
    assert net.state_dict().keys() == saved.keys()
    assert all(torch.equal(tensor, saved[name]) for name, tensor in net.state_dict().items())


def test_with_strokes_the_answer_is_the_normalised_product_of_both_models(paired_file):
    net = load_model(paired_file)
    torch.manual_seed(5)
    image, trajectory = torch.randn(1, 1, 28, 28) * 2, _trajectory(6) * 3
    with torch.no_grad():
        cnn = torch.softmax(net(image), 1)[0]  # the image alone: the ensemble's answer
        strokes = torch.softmax(net.trajectory(trajectory), 1)[0]
    product = cnn * strokes / (cnn * strokes).sum()
    both = predict(net, image, trajectory)
    assert both.probabilities == pytest.approx(product.tolist(), abs=1e-6)
    assert both.digit == int(product.argmax()) and both.confidence == max(both.probabilities)
    alone = predict(net, image)  # a drawing whose strokes are unknown: the CNN's answer
    assert alone.probabilities == pytest.approx(cnn.tolist(), abs=1e-6)
    batch = predict_batch(net, image.repeat(3, 1, 1, 1), torch.cat([trajectory, _trajectory(7, 2)]))
    assert batch[0].probabilities == pytest.approx(both.probabilities, abs=1e-6)


def test_a_model_without_the_model_of_the_strokes_ignores_the_strokes(net):
    image = torch.randn(1, 1, 28, 28)
    assert predict(net, image, _trajectory(8)).probabilities == predict(net, image).probabilities


@pytest.mark.parametrize("shape", [(1, 5), (2, 5, 64), (1, 4, 64)])
def test_predict_rejects_strokes_of_the_wrong_shape(paired_file, shape):
    with pytest.raises(ValueError, match="Expected trajectories"):
        predict(load_model(paired_file), torch.zeros(1, 1, 28, 28), torch.zeros(shape))


def _without_trajectory(state):
    return {k: v for k, v in state.items() if not k.startswith("trajectory.")}


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_without_trajectory, r"incomplete: it says it holds the model of the strokes .* missing"),
        (
            lambda s: {k: v for k, v in s.items() if k != "trajectory.head.1.bias"},
            r"incomplete: its model of the strokes lacks head\.1\.bias",
        ),
        (
            lambda s: {k: v for k, v in s.items() if k != "trajectory_points"},
            r"does not match.*weights of a model of the strokes but no trajectory_points",
        ),
        (lambda s: {**s, "trajectory_points": torch.tensor(32)}, r"reads 32 points"),
        (
            lambda s: {**s, "trajectory.head.1.weight": torch.full((10, 256), float("inf"))},
            r"corrupt: trajectory\.head\.1\.weight holds NaN or infinite",
        ),
        (
            lambda s: {**s, "trajectory.head.1.weight": torch.zeros(10, 128)},
            r"(?s)does not match.*size mismatch.*trajectory\.head\.1\.weight",
        ),
        (lambda s: {**s, "trajectory.extra": torch.zeros(1)}, r"unexpected keys trajectory\.extra"),
    ],
    ids=["missing", "part-missing", "no-points", "other-points", "inf", "wrong-shape", "extra"],
)
def test_a_damaged_model_of_the_strokes_is_a_clear_error_naming_the_file(
    tmp_path, paired_file, damage, message
):
    assert_damage_named(tmp_path, paired_file, damage, message)


def test_adding_the_model_of_the_strokes_leaves_the_random_numbers_that_follow_alone():
    """The CNN of `train.py --members 2` trains exactly as before the model of the strokes."""
    torch.manual_seed(9)
    DigitCNN(members=2)
    without = torch.rand(3)
    torch.manual_seed(9)
    DigitCNN(members=2, trajectory=True)
    assert torch.equal(torch.rand(3), without)


@pytest.mark.parametrize("trajectory", [True, False])
def test_the_compiled_model_answers_as_the_model_with_strokes_and_without(trajectory):
    """model.Compiled (what the app serves): the same probabilities, with strokes and without,
    one drawing or several."""
    torch.manual_seed(10)
    net = DigitCNN(members=2, trajectory=trajectory).eval()
    fast = model.Compiled(net)
    for count in (1, 3):
        images = torch.randn(count, 1, 28, 28) * 2
        for trajectories in (_trajectory(11, count) * 3, None):
            expected = predict_batch(net, images, trajectories)
            for got, want in zip(predict_batch(fast, images, trajectories), expected, strict=True):
                assert got.probabilities == pytest.approx(want.probabilities, abs=1e-5)
                assert got.digit == want.digit
