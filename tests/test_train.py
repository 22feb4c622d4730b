"""train.py, mostly as a real process on the committed MNIST and pen subsets: it learns,
checkpoints every epoch, survives SIGKILL at any moment (the drill's moments come from the seed it
prints, pytest -s; ``DRILL_SEED=<seed>`` replays them) and SIGTERM, and fails clearly."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from mnist_files import PEN_SUBSET, SUBSET

import pendigits
import train
from lab import free_port, people
from model import DigitCNN, load_model
from training import sources
from training.checkpoints import checkpoint_name, list_checkpoints, load_newest_checkpoint
from training.config import FINE_TUNE, SCRATCH, SetupError, TrainConfig

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
LIMIT = 600  # MNIST images, plus 400 pen renderings: 1,000 images, 8 steps of 128 per epoch
STEPS = 8
TRAJECTORY_EPOCHS = "2"  # then the model of the strokes: 80 pen digits, 2 steps of 64 per epoch
DONE = re.compile(r"INFO epoch (\d+)/\d+ done")  # the image CNN's epochs
ANY_DONE = re.compile(r"INFO (trajectory )?epoch (\d+)/\d+ done")
SAVED = re.compile(r"checkpoint saved: .*checkpoint-e(\d{4})-s000000\.pt")
RESUMED = re.compile(r"resuming from epoch (\d+) step (\d+)")
FEEDBACK = re.compile(r"feedback: (\d+) answered drawings")


def train_command(directory: Path, *extra: str) -> list[str]:
    return [
        sys.executable, str(ROOT / "train.py"),
        "--data-dir", str(SUBSET), "--pen-file", str(PEN_SUBSET),
        "--out", str(directory / "out" / "model.pth"),
        "--checkpoint-dir", str(directory / "ckpt"),
        "--limit", str(LIMIT), "--epochs", "3", "--log-every", "0.2",
        "--trajectory-epochs", TRAJECTORY_EPOCHS, *extra,
    ]  # fmt: skip


def run(command: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env or ENV
    )


def start_until(
    command: list[str], pattern: str, env: dict | None = None
) -> tuple[subprocess.Popen, str]:
    """train.py started, its output read as it comes until a line matches *pattern* (or it
    ends): the process and the output so far."""
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env or ENV,
    )
    text = ""
    for line in process.stdout:
        text += line
        if re.search(pattern, line):
            break
    return process, text


def answered(server, count: int, seed: int = 0) -> list[people.Answer]:
    """*count* pen digits of the subset answered in the app's database on *server* (its tables
    created if missing), as people's drawings."""
    people.create_schema(server.url)
    digits = pendigits.load(PEN_SUBSET)[seed : seed + count]
    return people.answer_all(server.url, digits, DigitCNN().eval(), "model.pth@0123456789ab")


def epochs_done(text: str, cnn_epochs: int = 3) -> list[int]:
    """The epochs a log says are done, counted as checkpoints count them: those of the model of
    the strokes after the image CNN's."""
    return [int(n) + (cnn_epochs if kind else 0) for kind, n in ANY_DONE.findall(text)]


def checkpoints(directory: Path) -> list[str]:
    return [path.name for path in list_checkpoints(directory)]


def newest_loadable(directory: Path) -> int:
    """Every checkpoint in *directory* loads (weights only): the newest one's epoch (0: none)."""
    states = [torch.load(p, weights_only=True) for p in list_checkpoints(directory)]
    assert all(state["step"] == 0 for state in states), "SIGKILL leaves no mid-epoch checkpoint"
    return max((state["epoch"] for state in states), default=0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, str]:
    """One uninterrupted run of 3 epochs that keeps 2 checkpoints: its folder and its log."""
    directory = tmp_path_factory.mktemp("trained")
    result = run(train_command(directory, "--keep", "2"))
    assert result.returncode == 0, result.stdout + result.stderr
    return directory, result.stdout


def test_a_run_learns_and_writes_the_model_its_report_and_the_newest_checkpoints(trained):
    directory, log = trained
    assert "starting from scratch" in log and "samples/s rss" in log
    assert epochs_done(log) == [1, 2, 3, 4, 5]  # 3 of the image CNN, then 2 of the strokes'
    net = load_model(directory / "out" / "model.pth")
    assert net.trajectory is not None
    report = json.loads((directory / "out" / "model.json").read_text())
    assert report["test_accuracy"] > 0.5  # 600 digits, 3 short epochs: 0.72; untrained: 0.1
    # Writers 3 and 8 of the subset are held out: 80 digits never trained on, 80 trained on.
    pen = report["pen_held_out"]
    assert pen["writers"] == list(pendigits.HELD_OUT_WRITERS) and pen["count"] == 80
    assert 0.3 < pen["accuracy"] <= 1 and set(pen["by_digit"]) == {str(d) for d in range(10)}
    # Measured as the app reads a drawing (its image and its strokes), and the image alone.
    assert 0.3 < pen["image_alone"]["accuracy"] <= 1 and "ece" in pen["image_alone"]
    assert report["trajectory_model"] and report["trajectory_epochs"] == 2
    assert "utils.trajectory" in report["measured_through"]
    assert report["training_images"] == {"mnist": LIMIT, "pen": 80 * 4}
    assert report["parameters"] == sum(p.numel() for p in net.parameters())
    assert checkpoints(directory / "ckpt") == [checkpoint_name(e, 0) for e in (5, 4)]
    assert not list(directory.rglob("*.tmp"))


def test_sigkill_at_three_random_moments_loses_at_most_the_epoch_in_progress(
    tmp_path, fresh_pg_server
):
    """On the three sources: MNIST, pen digits, and 30 drawings in the app's database, 5 more
    answered after each run: a resumed run trains on the drawings its first run read."""
    answered(fresh_pg_server, 30)
    env = {**ENV, "DATABASE_URL": fresh_pg_server.url}
    seed = int(os.environ.get("DRILL_SEED") or time.time_ns() % 10**9)
    rng = random.Random(seed)
    print(f"\nDRILL_SEED={seed}")

    def mid_epoch(epoch: int) -> tuple[str, float]:
        return rf"epoch {epoch}/3 step {rng.randint(1, STEPS)}/", rng.uniform(0, 0.3)

    # In epoch 1; right after epoch 2's "done" line, while its checkpoint is being written;
    # in epoch 3, in the epochs of the model of the strokes or in the final evaluation. Then a
    # run that is left to finish.
    moments = [mid_epoch(1), ("epoch 2/3 done", rng.uniform(0, 0.015))]
    moments += [
        rng.choice(
            [
                mid_epoch(3),
                (r"trajectory epoch \d/2 step", rng.uniform(0, 0.1)),
                ("training done in", rng.uniform(0, 0.3)),
            ]
        )
    ]
    command = train_command(tmp_path, "--log-every", "0", "--sources", "mnist,pen,feedback")
    ckpt = tmp_path / "ckpt"
    done, saved = [], set()  # epochs logged done (by every run) and logged saved
    read = 0  # drawings read by the run that started from scratch
    for index, moment in enumerate([*moments, None]):
        on_disk = newest_loadable(ckpt)
        process, text = start_until(command, moment[0] if moment else "(?!)", env)  # (?!): end
        try:
            if moment:
                time.sleep(moment[1])
                process.kill()
            text += process.communicate(timeout=300)[0]
        finally:
            process.kill()
        print(f"  run {index}: killed at {moment}: exit {process.returncode}")
        assert process.returncode == (-signal.SIGKILL if moment else 0), text[-3000:]
        resumed = RESUMED.search(text)
        assert ("starting from scratch" in text) == (resumed is None) == (on_disk == 0)
        [count] = map(int, FEEDBACK.findall(text))
        assert count == (read if resumed else 30 + 5 * index), "a resume reads what its run read"
        read = count
        answered(fresh_pg_server, 5, seed=100 + 5 * index)  # answered while the run is down
        first = int(resumed.group(1)) + 1 if resumed else 1
        assert first - 1 == on_disk, "it resumes from the newest checkpoint"
        ran = epochs_done(text)
        assert ran == list(range(first, first + len(ran)))
        # No epoch logged as saved is trained again; an epoch logged done can be, once, if the
        # kill fell before its checkpoint was renamed into place.
        assert max(saved, default=0) < first and max(done, default=0) <= first
        done += ran
        saved |= {int(epoch) for epoch in SAVED.findall(text)}
    assert set(done) == {1, 2, 3, 4, 5} and max(Counter(done).values()) <= 2, done
    load_model(tmp_path / "out" / "model.pth")
    report = json.loads((tmp_path / "out" / "model.json").read_text())
    assert report["epochs"] == 3 and report["sources"] == ["mnist", "pen", "feedback"]
    held = report["feedback_held_out"]  # 1 in 5 submissions, never trained on
    assert 0 < held["count"] == held["drawings"] < 15 and 0 <= held["accuracy"] <= 1
    assert report["training_images"]["feedback"] == 8 * (read - held["count"])
    assert newest_loadable(ckpt) == 5 and len(checkpoints(ckpt)) == 3
    assert not list(tmp_path.rglob("*.tmp"))


def test_sigterm_saves_a_loadable_checkpoint_mid_epoch_and_resumes_there(tmp_path):
    command = train_command(tmp_path, "--batch-size", "32", "--epochs", "2", "--log-every", "0")
    process, text = start_until(command, "epoch 1/2 step")
    try:
        process.send_signal(signal.SIGTERM)
        text += process.communicate(timeout=60)[0]
    finally:
        process.kill()
    assert process.returncode == train.EXIT_TERMINATED and "SIGTERM received" in text, text
    [saved] = checkpoints(tmp_path / "ckpt")
    state = torch.load(tmp_path / "ckpt" / saved, weights_only=True)
    assert state["epoch"] == 0 and state["step"] > 0
    assert not (tmp_path / "out" / "model.pth").exists()

    result = run(command)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"resuming from epoch 0 step {state['step']} ({saved})" in result.stdout
    assert [int(epoch) for epoch in DONE.findall(result.stdout)] == [1, 2]
    load_model(tmp_path / "out" / "model.pth")


def test_corrupt_checkpoints_are_skipped_with_a_warning(trained, tmp_path, caplog):
    ckpt = shutil.copytree(trained[0] / "ckpt", tmp_path / "ckpt")
    settings = torch.load(ckpt / checkpoint_name(5, 0), weights_only=True)["settings"]
    newest = ckpt / checkpoint_name(5, 0)
    newest.write_bytes(newest.read_bytes()[:1000])
    assert load_newest_checkpoint(ckpt, settings)["epoch"] == 4
    assert f"skipping corrupt checkpoint {newest.name}" in caplog.text
    (ckpt / checkpoint_name(4, 0)).write_bytes(b"garbage")
    assert load_newest_checkpoint(ckpt, settings) is None  # a fresh start


def test_a_resume_with_other_sources_is_refused(trained):
    ckpt = trained[0] / "ckpt"
    settings = torch.load(ckpt / checkpoint_name(5, 0), weights_only=True)["settings"]
    with pytest.raises(SetupError, match=r"trained on mnist\+pen; this run asks for mnist"):
        load_newest_checkpoint(ckpt, {**settings, "sources": ["mnist"]})


def test_checkpoints_of_a_run_with_other_settings_are_refused_unless_fresh(trained, tmp_path):
    shutil.copytree(trained[0] / "ckpt", tmp_path / "ckpt")
    command = train_command(tmp_path, "--lr", "0.2", "--epochs", "1", "--limit", "100")
    refused = run(command)
    assert refused.returncode == train.EXIT_BAD_INPUT, refused.stdout + refused.stderr
    assert re.search(r"other settings .*--fresh", refused.stdout), refused.stdout
    assert "Traceback" not in refused.stdout + refused.stderr
    fresh = run([*command, "--fresh"])
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    assert "epoch 1/1 done" in fresh.stdout


def test_members_train_together_and_a_fine_tune_of_them_keeps_them_all(tmp_path):
    """--members 2: one run trains both (each from its own start) into one file that loads as a
    2-member ensemble; --init of it fine-tunes both; --members other than its own is refused."""
    result = run(train_command(tmp_path, "--members", "2", "--epochs", "1"))
    assert result.returncode == 0, result.stdout + result.stderr
    out = tmp_path / "out" / "model.pth"
    net = load_model(out)
    report = json.loads(out.with_suffix(".json").read_text())
    assert len(net.members) == 2 and report["members"] == 2
    assert report["parameters"] == sum(p.numel() for p in net.parameters())
    first, second = (member.features[0][0].weight for member in net.members)
    assert not torch.equal(first, second)

    fine = ["--init", str(out), "--epochs", "1", "--epoch-size", "256"]
    command = train_command(tmp_path / "fine", *fine)
    at = command.index("--trajectory-epochs")
    tuned = run(command[:at] + command[at + 2 :])  # a fine-tune's defaults
    assert tuned.returncode == 0, tuned.stdout + tuned.stderr
    assert f"starting from the weights in {out} (2 members)" in tuned.stdout
    tuned_net = load_model(tmp_path / "fine" / "out" / "model.pth")
    assert len(tuned_net.members) == 2
    # Its model of the strokes is --init's, kept as it is (a fine-tune's default: 0 epochs of it).
    kept, before = tuned_net.trajectory.state_dict(), net.trajectory.state_dict()
    assert all(torch.equal(kept[name], before[name]) for name in before)
    refused = run(train_command(tmp_path / "other", *fine, "--members", "3"))
    assert refused.returncode == train.EXIT_BAD_INPUT, refused.stdout + refused.stderr
    assert "holds 2 members, not --members 3" in refused.stdout


def test_missing_data_is_a_clear_error_with_exit_code_2(tmp_path):
    result = run([*train_command(tmp_path), "--data-dir", str(tmp_path / "nothing")])
    assert result.returncode == train.EXIT_BAD_INPUT
    assert "MNIST files missing" in result.stdout and "--download" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_an_unexpected_crash_is_logged_with_traceback_and_exit_code_1(tmp_path):
    (tmp_path / "out").write_text("a file where the output folder should be")
    result = run(train_command(tmp_path, "--epochs", "1", "--limit", "100"))
    assert result.returncode == train.EXIT_ERROR
    assert "training crashed" in result.stdout and "Traceback" in result.stdout
    assert checkpoints(tmp_path / "ckpt"), "the finished epoch's checkpoint is kept for a resume"


@pytest.mark.parametrize(
    "flags",
    [
        ["--epochs", "0"],
        ["--limit", "0"],
        ["--pen-share", "1"],
        ["--sources", "mnist,paper"],
        ["--members", "0"],
        ["--trajectory-epochs", "-1"],
        ["--trajectory-epochs", "3", "--sources", "mnist"],
    ],
)
def test_bad_flags_are_rejected_with_exit_code_2(flags, capsys):
    with pytest.raises(SystemExit) as exit_:
        train.parse_args(flags)
    assert exit_.value.code == 2 and flags[0] in capsys.readouterr().err


def test_feedback_from_an_unreachable_database_is_a_clear_error_with_exit_code_2(tmp_path):
    closed = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    command = train_command(tmp_path, "--sources", "mnist,pen,feedback")
    result = run(command, env={**ENV, "DATABASE_URL": closed})
    assert result.returncode == train.EXIT_BAD_INPUT, result.stdout + result.stderr
    assert "database unreachable" in result.stdout and "DATABASE_URL" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_promote_through_the_cli_one_promoted_then_one_refused_that_changes_nothing(
    fresh_pg_server, tmp_path
):
    """train.py --promote with the real registry and PostgreSQL (tests/test_registry_promotion.py
    tests the rule itself). The live model starts as untrained weights in --out: a candidate
    fine-tuned from the shipped model beats it (exit 0); then one trained from scratch on 100
    images loses to that one (exit EXIT_REFUSED) and leaves --out and model.json as they were."""
    from registry import promotion, store

    answers = answered(fresh_pg_server, 30)
    held = [a for a in answers if sources.is_held_out(*submission(fresh_pg_server, a))]
    out = tmp_path / "out" / "model.pth"
    out.parent.mkdir()
    torch.manual_seed(0)
    torch.save(DigitCNN().state_dict(), out)  # the first live version: registered from --out
    out.with_suffix(".json").write_text('{"about": "untrained"}\n')
    env = {**ENV, "DATABASE_URL": fresh_pg_server.url}
    command = train_command(tmp_path, "--sources", "mnist,pen,feedback", "--promote")
    command += ["--epochs", "1", "--limit", "100", "--fresh"]

    promoted = run([*command, "--init", str(ROOT / "models" / "model.pth"), "--lr", "0.001"], env)
    assert promoted.returncode == 0, promoted.stdout + promoted.stderr
    assert "PROMOTED" in promoted.stdout
    sets = r"^(held-out feedback|MNIST test|held-out pen writers) +(\d+)"
    rows = re.findall(sets, promoted.stdout, re.MULTILINE)[:3]  # the table (logged twice)
    assert rows == [("held-out feedback", str(len(held))), ("MNIST test", "100"),
                    ("held-out pen writers", "80")]  # fmt: skip
    candidate = tmp_path / "ckpt" / "candidate.pth"
    assert out.read_bytes() == candidate.read_bytes()
    info = json.loads(out.with_suffix(".json").read_text())
    assert info == json.loads(candidate.with_suffix(".json").read_text()) and info["init"]
    with fresh_pg_server.connect() as conn:
        assert store.live_sha(conn) == store.sha256_of(out.read_bytes())

    live_bytes, live_json = out.read_bytes(), out.with_suffix(".json").read_bytes()
    refused = run(command, env)
    assert refused.returncode == promotion.EXIT_REFUSED, refused.stdout + refused.stderr
    assert "REFUSED" in refused.stdout and "not promoted" in refused.stdout
    assert out.read_bytes() == live_bytes and out.with_suffix(".json").read_bytes() == live_json
    with fresh_pg_server.connect() as conn:
        assert store.live_sha(conn) == store.sha256_of(live_bytes)


def submission(server, answer: people.Answer) -> tuple[object, int]:
    with server.connect() as conn:
        [(submission_id,)] = conn.execute(
            "SELECT submission_id FROM predictions WHERE id = %s", (answer.prediction_id,)
        )
    return submission_id, answer.prediction_id


def test_init_switches_to_the_fine_tune_defaults_and_a_flag_given_overrides_them():
    scratch, fine = train.parse_args([]), train.parse_args(["--init", "models/model.pth"])
    assert {name: getattr(scratch, name) for name in SCRATCH} == SCRATCH
    assert {name: getattr(fine, name) for name in FINE_TUNE} == FINE_TUNE
    assert fine.freeze_bn and not scratch.freeze_bn
    given = train.parse_args(["--init", "m.pth", "--lr", "0.01", "--no-freeze-bn"])
    assert given.lr == 0.01 and given.epochs == FINE_TUNE["epochs"] and not given.freeze_bn


def test_the_command_lines_defaults_are_a_train_configs():
    assert train.parse_args([]) == TrainConfig()
