"""train.py as a real process: it learns, checkpoints, survives SIGKILL and SIGTERM, and fails
clearly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mnist_files import copy_subset, write_random_mnist

import train
from model import DigitCNN, load_model

ROOT = Path(__file__).resolve().parent.parent
PEN_SUBSET = ROOT / "tests" / "data" / "pendigits-subset" / "pendigits-orig.tra"


def train_command(tmp_path: Path, *extra: str, data: Path | None = None) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "train.py"),
        "--data-dir", str(data or tmp_path / "data"),
        "--pen-file", str(PEN_SUBSET),
        "--out", str(tmp_path / "out" / "model.pth"),
        "--checkpoint-dir", str(tmp_path / "ckpt"),
        "--limit", "2000",
        "--epochs", "3",
        "--log-every", "0.2",
        *extra,
    ]  # fmt: skip


def run(command: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=_env()
    )


def _env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def start(command: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        command, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT, env=_env()
    )


def wait_for(predicate, timeout: float = 120, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def checkpoints(tmp_path: Path) -> list[str]:
    return [p.name for p in train.list_checkpoints(tmp_path / "ckpt")]


@pytest.fixture
def data(tmp_path):
    return copy_subset(tmp_path / "data")


def test_full_run_learns_and_writes_model_and_report(tmp_path, data):
    result = run(train_command(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "starting from scratch" in result.stdout
    for epoch in (1, 2, 3):
        assert f"epoch {epoch}/3 done" in result.stdout
    assert "samples/s rss" in result.stdout and " MB" in result.stdout

    net = load_model(tmp_path / "out" / "model.pth")
    assert sum(p.numel() for p in net.parameters()) > 0
    report = json.loads((tmp_path / "out" / "model.json").read_text())
    assert report["test_accuracy"] > 0.85  # 2,000 real digits, 3 epochs, 500 test digits
    # The subset's writers 3 and 8 are held out: 80 digits never trained on, 80 trained on.
    pen = report["pen_held_out"]
    assert pen["writers"] == [3, 8, 14, 19, 25, 30] and pen["count"] == 80
    assert 0.3 < pen["accuracy"] <= 1 and set(pen["by_digit"]) == {str(d) for d in range(10)}
    assert sum(pen["confusions"].values()) <= round(80 * (1 - pen["accuracy"]))
    assert report["epochs"] == 3 and report["sources"] == ["mnist", "pen"]
    assert report["training_images"] == {"mnist": 2000, "pen": 80 * 4}
    assert report["torch_version"] == torch.__version__
    assert report["parameters"] == sum(p.numel() for p in net.parameters())
    assert checkpoints(tmp_path) == [train.checkpoint_name(e, 0) for e in (3, 2, 1)]


def test_sigkill_after_first_checkpoint_resumes_from_it(tmp_path, data):
    log = tmp_path / "first.log"
    process = start(train_command(tmp_path), log)
    try:
        wait_for(lambda: checkpoints(tmp_path), what="the first checkpoint")
        process.kill()
    finally:
        process.wait(30)
    assert process.returncode == -signal.SIGKILL
    saved = checkpoints(tmp_path)
    assert saved[-1] == train.checkpoint_name(1, 0)
    assert "pen digits: 80 of 2 writers" in log.read_text()

    result = run(train_command(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    newest = saved[0]
    epoch = int(newest[12:16])
    assert f"resuming from epoch {epoch} step 0 ({newest})" in result.stdout
    for done in range(1, epoch + 1):
        assert f"epoch {done}/3 done" not in result.stdout  # not trained twice
    for todo in range(epoch + 1, 4):
        assert f"epoch {todo}/3 done" in result.stdout
    load_model(tmp_path / "out" / "model.pth")


def test_corrupt_newest_checkpoint_is_skipped_with_a_warning(tmp_path, data):
    assert run(train_command(tmp_path, "--epochs", "2")).returncode == 0
    (tmp_path / "out" / "model.pth").unlink()
    newest = tmp_path / "ckpt" / train.checkpoint_name(2, 0)
    newest.write_bytes(newest.read_bytes()[:1000])

    result = run(train_command(tmp_path, "--epochs", "2"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"skipping corrupt checkpoint {newest.name}" in result.stdout
    assert f"resuming from epoch 1 step 0 ({train.checkpoint_name(1, 0)})" in result.stdout
    assert "epoch 1/2 done" not in result.stdout and "epoch 2/2 done" in result.stdout
    load_model(tmp_path / "out" / "model.pth")


def test_only_corrupt_checkpoints_means_a_fresh_start(tmp_path, data):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / train.checkpoint_name(1, 0)).write_bytes(b"garbage")
    result = run(train_command(tmp_path, "--epochs", "1"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "skipping corrupt checkpoint" in result.stdout
    assert "starting from scratch" in result.stdout


def test_sigterm_saves_a_loadable_checkpoint_mid_epoch_and_resumes_there(tmp_path, data):
    log = tmp_path / "first.log"
    command = train_command(tmp_path, "--batch-size", "32", "--epochs", "2")
    process = start(command, log)
    try:
        wait_for(lambda: "epoch 1/2 step" in log.read_text(), what="training steps")
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    finally:
        process.kill()
    output = log.read_text()
    assert process.returncode == train.EXIT_TERMINATED, output
    assert "SIGTERM received" in output
    [saved] = checkpoints(tmp_path)
    state = torch.load(tmp_path / "ckpt" / saved, weights_only=True)
    assert state["epoch"] == 0 and state["step"] > 0
    assert not (tmp_path / "out" / "model.pth").exists()

    result = run(command)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"resuming from epoch 0 step {state['step']} ({saved})" in result.stdout
    assert "epoch 1/2 done" in result.stdout and "epoch 2/2 done" in result.stdout
    load_model(tmp_path / "out" / "model.pth")


def test_only_the_last_checkpoints_are_kept(tmp_path, data):
    result = run(train_command(tmp_path, "--epochs", "4", "--keep", "2", "--limit", "300"))
    assert result.returncode == 0, result.stdout
    assert checkpoints(tmp_path) == [train.checkpoint_name(4, 0), train.checkpoint_name(3, 0)]
    assert not [p for p in (tmp_path / "ckpt").iterdir() if p.suffix == ".tmp"]


def test_checkpoints_of_another_run_are_not_mixed_in(tmp_path, data):
    assert run(train_command(tmp_path, "--epochs", "1", "--limit", "300")).returncode == 0
    result = run(train_command(tmp_path, "--epochs", "1", "--limit", "300", "--lr", "0.2"))
    assert result.returncode == train.EXIT_BAD_INPUT
    assert "other settings" in result.stdout and "--fresh" in result.stdout
    fresh = run(
        train_command(tmp_path, "--epochs", "1", "--limit", "300", "--lr", "0.2", "--fresh")
    )
    assert fresh.returncode == 0, fresh.stdout


def test_a_resume_with_other_sources_is_refused(tmp_path, data):
    assert run(train_command(tmp_path, "--epochs", "1", "--limit", "300")).returncode == 0
    result = run(train_command(tmp_path, "--epochs", "1", "--limit", "300", "--sources", "mnist"))
    assert result.returncode == train.EXIT_BAD_INPUT
    assert "trained on mnist+pen; this run asks for mnist" in result.stdout


def test_an_empty_drawing_counts_as_wrong():
    blank = np.zeros((280, 280, 4), dtype=np.uint8)
    blank[:, :, 3] = 255
    predicted = train.predicted_digits(DigitCNN().eval(), [blank])
    assert predicted == [None]
    report = train.accuracy_report([1, 2, None, 4], [1, 2, 3, 5])
    assert report["accuracy"] == 0.5 and report["by_digit"] == {"1": 1, "2": 1, "3": 0, "5": 0}
    assert report["confusions"] == {"3 read as nothing": 1, "5 read as 4": 1}


def test_missing_data_is_a_clear_error_with_exit_code_2(tmp_path):
    result = run(train_command(tmp_path))
    assert result.returncode == train.EXIT_BAD_INPUT
    assert "MNIST files missing" in result.stdout and "--download" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_corrupt_data_is_a_clear_error(tmp_path):
    data = write_random_mnist(tmp_path / "data")
    images = data / "train-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:-30])
    result = run(train_command(tmp_path))
    assert result.returncode == train.EXIT_BAD_INPUT
    assert "train-images-idx3-ubyte.gz" in result.stdout


def test_an_unexpected_crash_is_logged_with_traceback_and_exit_code_1(tmp_path, data):
    (tmp_path / "out").write_text("a file where the output folder should be")
    result = run(train_command(tmp_path, "--epochs", "1", "--limit", "200"))
    assert result.returncode == train.EXIT_ERROR
    assert "training crashed" in result.stdout and "Traceback" in result.stdout
    assert checkpoints(tmp_path), "the finished epoch's checkpoint is kept for a resume"


def test_bad_flags_are_rejected_by_argparse(tmp_path):
    result = run([sys.executable, str(ROOT / "train.py"), "--epochs", "0"])
    assert result.returncode == 2 and "--epochs" in result.stderr


def test_cuda_requested_without_cuda_is_a_clear_error(tmp_path, data):
    if torch.cuda.is_available():
        pytest.fail("this test expects a CPU-only machine")
    result = run(train_command(tmp_path, "--device", "cuda"))
    assert result.returncode == train.EXIT_BAD_INPUT
    assert "CUDA is not available" in result.stdout


def test_device_auto_picks_cpu_here():
    assert train.select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_atomic_save_leaves_no_partial_file(tmp_path):
    target = tmp_path / "x.pt"
    train.atomic_save({"a": torch.zeros(3)}, target)
    assert torch.equal(torch.load(target, weights_only=True)["a"], torch.zeros(3))
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]
