"""The container promises, on a real Docker engine (marker ``docker``; see lab/compose_project.py
for how the throwaway project is made and when a missing engine fails or skips).

The project copy is built once; the tests run the commands of the README and deploy guide and
look at what a person would see: the page in Chromium, the rows in the compose database, the
files on the host, exit codes and logs. The app tests share one stack (the last one takes it
down); training runs once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest
from mnist_files import PEN_SUBSET, SUBSET

from lab import browser
from lab.compose_project import ROOT, ComposeProject, require_engine

pytestmark = pytest.mark.docker

UP = "docker compose up -d --build --wait"
TRAIN = "docker compose --profile train up -d train"
# Short training that still has epochs long enough to be stopped in (125 steps of 8), then 2
# epochs of the model of the strokes.
TRAIN_FLAGS = ["--workers", "2", "--epochs", "2", "--limit", "600", "--batch-size", "8",
               "--log-every", "0.5", "--trajectory-epochs", "2"]  # fmt: skip
PROGRESS = re.compile(r"epoch (\d+)/\d+ step (\d+)/(\d+) loss \S+ acc \S+ \S+ samples/s rss \d+ MB")
RESUMED = re.compile(r"resuming from epoch (\d+) step (\d+)")


@pytest.fixture(scope="module")
def project() -> Iterator[ComposeProject]:
    """The project copy with its image built (`docker compose build`, cached layers reused)."""
    require_engine()
    project = ComposeProject()
    try:
        project.compose("build", "app", timeout=1200)
        yield project
    finally:
        project.remove()


@pytest.fixture(scope="module")
def stack(project: ComposeProject) -> ComposeProject:
    project.run(UP)
    return project


def config(project: ComposeProject, *files: str, **env: str) -> subprocess.CompletedProcess:
    args = [arg for name in files for arg in ("-f", name)]
    return project.run(
        ["env", *(f"{k}={v}" for k, v in env.items()), "docker", "compose", *args, "config",
         "--format", "json"],
        check=False,
    )  # fmt: skip


def healthy(project: ComposeProject, service: str) -> None:
    for _ in range(180):
        if project.inspect(service, "{{.State.Health.Status}}") == "healthy":
            return
        time.sleep(1)
    raise AssertionError(f"{service} is not healthy\n{project.logs(service)[-3000:]}")


def draw_and_confirm(chromium, project: ComposeProject, digit: int = 7, before=None):
    """Open the app, draw *digit*, click Correct; returns what the page showed."""
    with browser.AppPage.open(chromium, project.url) as page:
        if before:
            before()
        page.draw_digit(digit)
        shown = page.wait_for_prediction()
        page.click_correct()
        alerts = page.alerts()
    return shown, alerts


def stored_rows(project: ComposeProject) -> list[tuple[int, int, float]]:
    out = project.psql(
        "SELECT predicted_digit, true_label, confidence FROM predictions ORDER BY id"
    )
    return [(int(p), int(t), float(c)) for p, t, c in (r.split("|") for r in out.splitlines())]


# --- the image --------------------------------------------------------------------------------


def test_image_runs_as_non_root_with_cpu_torch_and_no_secrets_or_extras(
    project: ComposeProject,
) -> None:
    probe = (
        "import importlib.util as u, json, os, torch; print(json.dumps({'uid': os.getuid(), "
        "'cuda': torch.version.cuda, 'pgserver': bool(u.find_spec('pgserver')), "
        "'files': sorted(os.listdir('.')), 'nvidia': [p for p in os.listdir(os.path.dirname("
        "os.path.dirname(torch.__file__))) if 'nvidia' in p]}))"
    )
    out = project.run(["docker", "run", "--rm", project.image, "python", "-c", probe]).stdout
    found = json.loads(out.strip().splitlines()[-1])
    assert found["uid"] != 0
    assert found["cuda"] is None and found["nvidia"] == []
    assert not found["pgserver"], "pgserver is for `make run` only"
    # .dockerignore: no secrets, data, tests or tooling in the image (the copy has a .env).
    assert {".env", ".git", "tests", "lab", "deploy", ".venv"}.isdisjoint(found["files"])
    assert {"app.py", "train.py", "models"} <= set(found["files"])


# --- compose config (no containers) ----------------------------------------------------------


def test_compose_refuses_to_start_without_a_password(project: ComposeProject) -> None:
    result = config(project, POSTGRES_PASSWORD="")  # the environment overrides .env
    assert result.returncode != 0 and "POSTGRES_PASSWORD is not set" in result.stderr


def test_database_is_never_published_and_https_unpublishes_the_app(
    project: ComposeProject,
) -> None:
    plain = json.loads(config(project).stdout)["services"]
    assert "ports" not in plain["db"]
    assert [(p["host_ip"], p["target"]) for p in plain["app"]["ports"]] == [("127.0.0.1", 8501)]
    https = config(project, "docker-compose.yml", "docker-compose.https.yml", DOMAIN="x.example")
    services = json.loads(https.stdout)["services"]
    assert not services["app"].get("ports") and "ports" not in services["db"]
    assert {p["published"] for p in services["caddy"]["ports"]} == {"80", "443"}


# --- the running stack -----------------------------------------------------------------------


def test_a_drawn_digit_is_predicted_and_correct_stores_a_row(stack, chromium) -> None:
    assert "(healthy)" in stack.run("docker compose ps").stdout
    before = stored_rows(stack)
    shown, alerts = draw_and_confirm(chromium, stack)
    assert shown.digit == 7, shown
    assert any(alert.startswith("Saved: you drew a 7") for alert in alerts), alerts
    new = stored_rows(stack)[len(before) :]
    assert len(new) == 1 and new[0][:2] == (7, 7)
    assert abs(new[0][2] * 100 - shown.confidence_percent) <= 0.05 + 1e-4


def test_a_crashed_app_is_restarted_by_its_policy_and_serves_again(stack) -> None:
    restarts = int(stack.inspect("app", "{{.RestartCount}}"))
    # A crash: Streamlit killed inside the container (`docker kill` is a manual stop, after
    # which Docker never restarts a container, whatever its policy).
    stack.compose("exec", "-T", "app", "sh", "-c", "kill -9 -1", check=False)
    deadline = time.monotonic() + 60
    while int(stack.inspect("app", "{{.RestartCount}}")) == restarts:
        assert time.monotonic() < deadline, "the app was not restarted"
        time.sleep(0.5)
    healthy(stack, "app")  # its health check: Streamlit answers again


def test_feedback_after_a_database_restart_is_stored_once(stack, chromium) -> None:
    before = len(stored_rows(stack))
    # The page is open and the app's pool holds connections when the database restarts.
    shown, alerts = draw_and_confirm(chromium, stack, 4, lambda: stack.compose("restart", "db"))
    assert any(alert.startswith("Saved: you drew a 4") for alert in alerts), alerts
    rows = stored_rows(stack)
    assert len(rows) == before + 1 and rows[-1][:2] == (4, 4), rows[before:]


def test_data_survives_down_and_up_and_down_v_removes_it(stack) -> None:
    """The last test of the stack: it leaves it down."""
    stack.psql("CREATE TABLE volume_probe (note text); INSERT INTO volume_probe VALUES ('kept')")
    stack.run("docker compose down")
    assert stack.compose("ps", "--all", "--quiet").stdout.strip() == ""
    stack.run(UP)
    assert stack.psql("SELECT note FROM volume_probe") == "kept"
    stack.run("docker compose down -v")
    assert f"{stack.name}_pgdata" not in stack.run(["docker", "volume", "ls", "-q"]).stdout.split()


def test_the_learner_checks_the_stack_s_answers_as_the_owner_capped_at_one_cpu(stack) -> None:
    """The learner service as shipped (profile learn): one check against the stack's database,
    as its owner over the compose network, counts the answers and waits for more."""
    learn = json.loads(stack.compose("--profile", "learn", "config", "--format", "json").stdout)
    service = learn["services"]["learner"]
    assert service["profiles"] == ["learn"] and "ports" not in service
    assert float(service["deploy"]["resources"]["limits"]["cpus"]) == 1.0
    result = stack.compose(
        "--profile", "learn", "run", "--rm", "learner", "python", "learner.py", "--once",
        timeout=300,
    )  # fmt: skip
    out = result.stdout + result.stderr
    assert re.search(r"\d+ new answers since the last attempt; the next at 200", out), out


# --- training ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trainer(project: ComposeProject) -> ComposeProject:
    """The train service as shipped, with short-run flags appended to its command."""
    shutil.copytree(SUBSET, project.dir / "data" / "mnist", dirs_exist_ok=True)
    (project.dir / "data" / "pendigits").mkdir(exist_ok=True)
    shutil.copy2(PEN_SUBSET, project.dir / "data" / "pendigits")
    if os.geteuid() == 0:
        subprocess.run(["chown", "-R", "1000:1000", "data"], cwd=project.dir, check=True)
    shipped = json.loads(project.compose("--profile", "train", "config", "--format", "json").stdout)
    command = shipped["services"]["train"]["command"] + TRAIN_FLAGS
    project.add_override(
        "train-short.yml", f"services:\n  train:\n    command: {json.dumps(command)}\n"
    )
    return project


def wait_exit(project: ComposeProject, timeout: float = 600) -> int:
    return int(project.run(["docker", "wait", project.container("train")], timeout=timeout).stdout)


def wait_mid_epoch(project: ComposeProject, timeout: float = 300) -> None:
    """Wait for a progress line in the first three quarters of an epoch."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(int(s) < int(n) * 3 // 4 for _, s, n in PROGRESS.findall(project.logs("train"))):
            return
        time.sleep(0.2)
    raise AssertionError(f"no progress line:\n{project.logs('train')[-3000:]}")


def test_training_stopped_mid_epoch_resumes_and_finishes_with_two_workers(trainer) -> None:
    shipped_model = (ROOT / "models" / "model.pth").read_bytes()
    trainer.run(TRAIN)
    wait_mid_epoch(trainer)
    trainer.run("docker compose stop train")
    assert wait_exit(trainer) == 143, trainer.logs("train")[-3000:]
    logs = trainer.logs("train")
    assert re.search(r"SIGTERM received: checkpoint of epoch \d+ step \d+ saved", logs), logs

    trainer.run(TRAIN)
    assert wait_exit(trainer) == 0, trainer.logs("train")[-4000:]
    state = json.loads(trainer.inspect("train", "{{json .State}}"))
    assert not state["OOMKilled"]
    assert state.get("Health") is None, "no health check: the image's polls Streamlit"
    logs = trainer.run("docker compose logs train").stdout
    assert len(RESUMED.findall(logs)) == 1, logs[-3000:]
    # Two workers pass their batches through Docker's default 64 MB /dev/shm.
    assert "Bus error" not in logs and "epoch 2/2 done" in logs, logs[-3000:]
    model = trainer.dir / "models" / "model.pth"
    assert model.is_file() and model.read_bytes() != shipped_model
    assert (ROOT / "models" / "model.pth").read_bytes() == shipped_model
