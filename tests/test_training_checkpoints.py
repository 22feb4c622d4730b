"""training/checkpoints.py: a file whole or absent, a checkpoint from before a setting existed
(the checkpoints of real runs: test_train.py)."""

import pytest
import torch

from training.checkpoints import (
    OLD_SETTINGS,
    atomic_save,
    checkpoint_name,
    load_newest_checkpoint,
)
from training.config import SetupError, TrainConfig


def test_an_interrupted_atomic_save_leaves_the_old_file_and_nothing_else(tmp_path, monkeypatch):
    target = tmp_path / "x.pt"
    atomic_save({"a": torch.zeros(3)}, target)

    def save_half(obj, handle):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", save_half)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"a": torch.ones(3)}, target)
    assert torch.equal(torch.load(target, weights_only=True)["a"], torch.zeros(3))
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


def test_a_checkpoint_from_before_members_and_the_trajectory_model_still_resumes(tmp_path):
    settings = TrainConfig(members=1, trajectory_epochs=0).run_settings()
    old = {name: value for name, value in settings.items() if name not in OLD_SETTINGS}
    state = {"model": {}, "settings": old, "epoch": 3, "step": 0}
    atomic_save(state, tmp_path / checkpoint_name(3, 0))
    assert load_newest_checkpoint(tmp_path, settings)["epoch"] == 3
    with pytest.raises(SetupError, match="other settings"):
        load_newest_checkpoint(tmp_path, {**settings, "members": 2})
