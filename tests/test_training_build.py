"""training/build.py: the device a run asks for."""

import pytest
import torch

from training.build import select_device
from training.config import SetupError


@pytest.mark.parametrize("cuda", [True, False])
def test_auto_takes_cuda_when_there_is_one_and_cuda_without_one_is_refused(cuda, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert select_device("auto").type == ("cuda" if cuda else "cpu")
    if cuda:
        assert select_device("cuda:1") == torch.device("cuda:1")
    else:
        with pytest.raises(SetupError, match="CUDA is not available"):
            select_device("cuda")
