"""training/loops.py: an epoch of the image CNN and of the model of the strokes, stopped and
resumed."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from mnist_files import PEN_SUBSET
from torch.utils.data import DataLoader, TensorDataset

import pendigits
from model import DigitCNN, load_model
from training.config import TrainConfig
from training.loops import (
    TRAJECTORY_LR,
    Progress,
    StopRequested,
    train_one_epoch,
    train_trajectory_epoch,
)

ROOT = Path(__file__).resolve().parent.parent


def test_a_trajectory_epoch_stopped_mid_way_resumes_to_the_same_weights():
    """SIGTERM in the epochs of the model of the strokes: the checkpoint holds the step reached, and
    the resumed epoch (its inputs drawn again from the seed) trains exactly as one never
    stopped."""
    digits = pendigits.load(PEN_SUBSET)[:150]
    labels = torch.tensor([digit.label for digit in digits])
    config = TrainConfig(epochs=3, trajectory_epochs=2, seed=1, log_every=60)

    def fresh():
        torch.manual_seed(0)
        net = DigitCNN(trajectory=True)
        optimizer = torch.optim.AdamW(net.trajectory.parameters(), lr=TRAJECTORY_LR)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.003, total_steps=10)
        return net, optimizer, schedule

    def epoch(net, optimizer, schedule, progress, stop):
        train_trajectory_epoch(
            net.trajectory, digits, labels, optimizer, schedule, "cpu", config, progress, stop
        )

    whole = fresh()
    epoch(*whole, Progress(3, 0), SimpleNamespace(check=lambda: None))

    stopped, progress, steps = fresh(), Progress(3, 0), []

    def stop_after_one():
        steps.append(progress.step)
        if progress.step == 1:
            raise StopRequested("SIGTERM")

    with pytest.raises(StopRequested):
        epoch(*stopped, progress, SimpleNamespace(check=stop_after_one))
    assert progress.step == 1  # what the checkpoint records
    state = {name: part.state_dict() for name, part in zip("nos", stopped, strict=True)}
    rng = torch.get_rng_state()
    resumed = fresh()
    for name, part in zip("nos", resumed, strict=True):
        part.load_state_dict(state[name])
    torch.set_rng_state(rng)
    epoch(*resumed, progress, SimpleNamespace(check=lambda: None))
    assert progress.step == 3  # 150 digits, 64 a step
    for name, tensor in whole[0].state_dict().items():
        assert torch.equal(tensor, resumed[0].state_dict()[name]), name


@pytest.mark.parametrize("freeze", [True, False])
def test_a_fine_tune_keeps_the_live_models_batchnorm_statistics(freeze):
    net = load_model(ROOT / "models" / "model.pth")
    stats = {k: v.clone() for k, v in net.state_dict().items() if "running" in k}
    weights = [p.detach().clone() for p in net.parameters()]
    config = TrainConfig.from_settings(
        init=Path("m.pth"), log_every=0, freeze_bn=None if freeze else False
    )
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 28, 28), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (64,), generator=generator)
    loader = DataLoader(TensorDataset(images, labels, torch.zeros(64, dtype=torch.bool)), 32)
    optimizer = torch.optim.SGD(net.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=2)
    stop = SimpleNamespace(check=lambda: None)
    train_one_epoch(net, loader, optimizer, scheduler, "cpu", config, Progress(0, 0), 2, stop)
    after = {k: v for k, v in net.state_dict().items() if "running" in k}
    assert all(torch.equal(stats[k], after[k]) for k in stats) == freeze
    assert not all(torch.equal(w, p) for w, p in zip(weights, net.parameters(), strict=True))
