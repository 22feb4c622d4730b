"""training/checkpoints.py: a file whole or absent (the checkpoints of real runs: test_train.py)."""

import pytest
import torch

from training.checkpoints import atomic_save


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
