"""The container setup: Dockerfile, .dockerignore, docker-compose.yml and the HTTPS override.

No Docker engine runs here, so the files are checked statically (hadolint, PyYAML), and the
exact commands the image and compose run are executed on the host: the image's CMD must come up
and answer the image's own HEALTHCHECK command, and the train service's command must train a
model from a tiny MNIST-format dataset written by the test.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from mnist_files import copy_subset

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_HTTPS = ROOT / "docker-compose.https.yml"
CADDYFILE = ROOT / "deploy" / "Caddyfile"
ENV_EXAMPLE = ROOT / ".env.example"
REQUIREMENTS = ROOT / "requirements.txt"
STREAMLIT_CONFIG = ROOT / ".streamlit" / "config.toml"

# The interpreter running the tests is the project's virtualenv: its bin/ goes first on PATH so
# that `python` and `streamlit` in the image's commands resolve to it.
VENV_BIN = Path(sys.executable).parent
CONTAINER_PORT = 8501
HEALTH_PATH = "/_stcore/health"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


# --------------------------------------------------------------------------------------------
# Parsing helpers
# --------------------------------------------------------------------------------------------


def dockerfile_instructions(text: str | None = None) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, continuation lines joined."""
    text = DOCKERFILE.read_text() if text is None else text
    instructions: list[tuple[str, str]] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comments may sit between continuation lines, as in Docker
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, args = current.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        current = ""
    assert not current, "Dockerfile ends with a line continuation"
    return instructions


def instructions_named(name: str) -> list[str]:
    return [args for keyword, args in dockerfile_instructions() if keyword == name]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(a, str) for a in value), args
    return value


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for args in instructions_named("ENV"):
        for item in shlex.split(args):
            key, sep, value = item.partition("=")
            assert sep, f"use the ENV key=value form: {args}"
            env[key] = value
    return env


def healthcheck() -> tuple[dict[str, str], list[str]]:
    """The HEALTHCHECK's options and its exec-form command."""
    (args,) = instructions_named("HEALTHCHECK")
    options, cmd = {}, None
    tokens = args.split(" ")
    for i, token in enumerate(tokens):
        if token == "CMD":
            cmd = exec_form(" ".join(tokens[i + 1 :]))
            break
        key, _, value = token.partition("=")
        options[key.lstrip("-")] = value
    assert cmd is not None, "HEALTHCHECK needs an exec-form CMD [...]"
    return options, cmd


def image_cmd() -> list[str]:
    cmds = instructions_named("CMD")
    assert cmds, "the Dockerfile has no CMD"
    return exec_form(cmds[-1])


def seconds(duration: str | int) -> float:
    """Docker/compose durations: 30s, 1m30s, 500ms, 1h."""
    if isinstance(duration, int):
        return float(duration)
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"bad duration {duration!r}"
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    return sum(float(n) * scale[u] for n, u in parts)


def size_bytes(size: str | int) -> int:
    """Compose byte sizes: 2g, 2gb, 1024m, 512mb, or a plain number of bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([bkmg]?)b?", size.strip().lower())
    assert match, f"bad size {size!r}"
    scale = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
    return int(float(match[1]) * scale[match[2]])


class Tagged:
    """A value carrying a compose YAML tag such as !reset or !override."""

    def __init__(self, tag: str, value: Any):
        self.tag, self.value = tag, value


class ComposeLoader(yaml.SafeLoader):
    pass


def _tagged(loader: yaml.SafeLoader, node: yaml.Node) -> Tagged:
    if isinstance(node, yaml.SequenceNode):
        value: Any = loader.construct_sequence(node)
    elif isinstance(node, yaml.MappingNode):
        value = loader.construct_mapping(node)
    else:
        value = loader.construct_scalar(node)
    return Tagged(node.tag, value)


ComposeLoader.add_constructor("!reset", _tagged)
ComposeLoader.add_constructor("!override", _tagged)


def load_compose(path: Path = COMPOSE) -> dict[str, Any]:
    data = yaml.load(path.read_text(), Loader=ComposeLoader)  # noqa: S506 (SafeLoader subclass)
    assert isinstance(data, dict)
    return data


class MissingVariable(Exception):
    pass


_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<name>[A-Za-z_]\w*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_]\w*))"
)


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable interpolation, applied to every string value of a parsed file."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, Tagged):
        return Tagged(value.tag, interpolate(value.value, env))
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["name"] or match["bare"]
        op, arg, current = match["op"], match["arg"] or "", env.get(name)
        if op in (":?", "?") and (current is None or (op == ":?" and current == "")):
            raise MissingVariable(f"{name}: {arg}")
        if op == ":-":
            return current or arg
        if op == "-":
            return arg if current is None else current
        return current or ""

    return _VAR.sub(replace, value)


def compose_variables(text: str) -> dict[str, str | None]:
    """Variable name -> its ${VAR<op>arg} operator (None for a bare ${VAR} or $VAR)."""
    found: dict[str, str | None] = {}
    for match in _VAR.finditer(text):
        if match["escaped"]:
            continue
        found[match["name"] or match["bare"]] = match["op"]
    return found


def services() -> dict[str, dict[str, Any]]:
    return load_compose()["services"]


def memory_limit(service: dict[str, Any]) -> int:
    limit = service.get("deploy", {}).get("resources", {}).get("limits", {}).get("memory")
    limit = limit or service.get("mem_limit")
    assert limit, "no memory limit (deploy.resources.limits.memory)"
    return size_bytes(limit)


def short_volumes(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(source, target, mode) of each volume, short or long syntax."""
    result = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            mode = "ro" if volume.get("read_only") else "rw"
            result.append((volume["source"], volume["target"], mode))
        else:
            source, target, *rest = volume.split(":")
            result.append((source, target, rest[0] if rest else "rw"))
    return result


def env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example: not KEY=VALUE: {line!r}"
            values[key.strip()] = value.strip()
    return values


def torch_pin() -> str:
    pins = re.findall(r"^torch==([^\s;#]+)", REQUIREMENTS.read_text(), flags=re.MULTILINE)
    assert len(pins) == 1, "requirements.txt must pin torch exactly once (torch==X.Y.Z)"
    return pins[0]


def find_tool(name: str) -> str:
    path = shutil.which(name, path=os.pathsep.join([str(VENV_BIN), os.environ.get("PATH", "")]))
    assert path, f"{name} not found: pip install -r requirements-dev.txt"
    return path


# --------------------------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------------------------


def test_hadolint_reports_no_warnings_or_errors(tmp_path: Path) -> None:
    config = tmp_path / "hadolint.yaml"
    config.write_text("{}\n")  # no config-file ignores: only justified inline pragmas count
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    result = subprocess.run(
        [find_tool("hadolint"), "--config", str(config), "--no-color", "-f", "json", "Dockerfile"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    findings = json.loads(result.stdout or "[]")
    serious = [f for f in findings if f["level"] in ("warning", "error")]
    assert not serious, json.dumps(serious, indent=2)
    assert result.returncode in (0, 1), result.stderr  # 1: only info/style findings


def test_hadolint_ignores_are_justified() -> None:
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint" in line and "ignore" in line:
            assert re.fullmatch(r"# hadolint ignore=[A-Z]{2}\d{4}(,[A-Z]{2}\d{4})*", line.strip())
            previous = lines[i - 1].strip() if i else ""
            assert previous.startswith("#") and "hadolint" not in previous, (
                f"line {i + 1}: explain an ignored hadolint rule in a comment just above it"
            )


def test_base_image_is_a_pinned_python_311_slim() -> None:
    (base,) = instructions_named("FROM")
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-[a-z]+)?(@sha256:[0-9a-f]{64})?", base), base


def test_runs_as_a_non_root_user_created_with_uid_1000() -> None:
    keywords = [keyword for keyword, _ in dockerfile_instructions()]
    users = instructions_named("USER")
    assert users, "no USER: the container would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), user
    assert keywords.index("CMD") > max(i for i, k in enumerate(keywords) if k == "USER")
    # UID 1000 is what docker-compose.yml (TRAIN_UID), the docs and setup-server.sh chown to.
    runs = " ".join(instructions_named("RUN"))
    assert re.search(r"useradd\b.*--uid 1000\b", runs), "create the user with --uid 1000"
    assert user in ("1000", "app"), user


def test_environment_is_unbuffered_with_bounded_thread_counts() -> None:
    env = dockerfile_env()
    assert env.get("PYTHONUNBUFFERED") == "1"
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        assert env.get(name, "").isdigit() and 1 <= int(env[name]) <= 4, f"{name}={env.get(name)}"


def test_torch_comes_from_the_cpu_index_at_the_requirements_version() -> None:
    pin = torch_pin()
    runs = instructions_named("RUN")
    torch_runs = [r for r in runs if re.search(r"\btorch==", r)]
    assert torch_runs, "install torch explicitly from the CPU index"
    install = torch_runs[0]
    versions = set(re.findall(r"\btorch==([^\s'\"]+)", " ".join(runs)))
    assert versions == {pin}, f"Dockerfile torch {versions} != requirements.txt torch=={pin}"
    assert re.search(rf"--(extra-)?index-url[ =]{re.escape(CPU_INDEX)}\b", install), install
    # torch is installed before requirements.txt, so pip finds it satisfied and never pulls the
    # CUDA build from PyPI.
    text = " ".join(runs)
    assert text.index("torch==") < text.index("-r requirements.txt")


def test_no_cuda_in_the_image() -> None:
    text = " ".join(f"{k} {a}" for k, a in dockerfile_instructions()).lower()
    text = text.replace("torch.version.cuda", "")  # the build's own "no CUDA" assertion
    for needle in ("nvidia", "/whl/cu", "cuda"):
        assert needle not in text, needle


def test_pip_installs_use_no_cache_dir() -> None:
    installs = [r for r in instructions_named("RUN") if "pip install" in r]
    assert installs
    for run in installs:
        for command in re.split(r"&&|;", run):
            if "pip install" in command:
                assert "--no-cache-dir" in command, command


def test_dependencies_are_installed_before_the_code_is_copied() -> None:
    instructions = dockerfile_instructions()
    install = next(
        i
        for i, (k, a) in enumerate(instructions)
        if k == "RUN" and "pip install" in a and "requirements" in a
    )
    copies_before = [a for k, a in instructions[:install] if k in ("COPY", "ADD")]
    assert copies_before, "copy requirements.txt before installing"
    for args in copies_before:
        sources = [s for s in args.split() if not s.startswith("--")][:-1]
        assert sources and all(re.fullmatch(r"requirements[\w.-]*\.txt", s) for s in sources), (
            f"only requirement files may be copied before the dependency layer: COPY {args}"
        )
    copies_after = [a for k, a in instructions[install:] if k == "COPY"]
    assert any(a.split()[0] in (".", "app.py") for a in copies_after), "no code layer"


def test_healthcheck_polls_streamlit_with_python_and_patient_timings() -> None:
    options, cmd = healthcheck()
    assert cmd[0] == "python", "slim images have no curl/wget: use python"
    assert f"localhost:{CONTAINER_PORT}{HEALTH_PATH}'" in " ".join(cmd)
    # Streamlit answers any unknown path with its index page and 200: check the body too
    assert "b'ok'" in " ".join(cmd)
    assert 10 <= seconds(options["interval"]) <= 120
    assert 5 <= seconds(options["timeout"]) < seconds(options["interval"])
    assert seconds(options["start-period"]) >= 30, "model load on a small VM takes a while"
    assert int(options["retries"]) >= 3


def test_cmd_runs_streamlit_on_all_interfaces() -> None:
    assert image_cmd() == [
        "streamlit",
        "run",
        "app.py",
        "--server.address=0.0.0.0",
        f"--server.port={CONTAINER_PORT}",
        "--server.headless=true",
    ]
    assert str(CONTAINER_PORT) in instructions_named("EXPOSE")[0].split()


def test_no_secrets_in_the_dockerfile() -> None:
    text = DOCKERFILE.read_text()
    assert not re.search(r"(PASSWORD|SECRET|TOKEN|API_KEY)\w*\s*[=:]\s*\S", text, re.IGNORECASE)
    for args in instructions_named("ENV") + instructions_named("ARG"):
        assert not re.search(r"PASSWORD|SECRET|TOKEN|DATABASE_URL", args, re.IGNORECASE), args


# --------------------------------------------------------------------------------------------
# .dockerignore and Streamlit config
# --------------------------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1].replace("[!", "[^"), end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps *path* out of the build context (Docker's rules: last
    matching pattern wins, ! re-includes, a matching directory excludes everything in it)."""
    excluded = False
    prefixes = ["/".join(path.split("/")[: n + 1]) for n in range(path.count("/") + 1)]
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        regex = _pattern_regex(line.lstrip("!").strip("/"))
        if any(regex.fullmatch(p) for p in prefixes):
            excluded = not negate
    return excluded


@pytest.mark.parametrize(
    "path",
    [
        ".git/HEAD",
        ".venv/bin/python",
        "data/mnist/train-images-idx3-ubyte.gz",
        "data/postgres/PG_VERSION",
        "models/checkpoints/epoch-001.pt",
        ".env",
        ".env.production",
        ".streamlit/secrets.toml",
        "test-artifacts/screenshot.png",
        "tests/test_docker.py",
        "__pycache__/db.cpython-311.pyc",
        "pkg/__pycache__/x.cpython-311.pyc",
        ".pytest_cache/v/cache/lastfailed",
        ".ruff_cache/x",
        "deploy/setup-server.sh",
        "backups/mnist-20250101T000000Z.sql.gz",
    ],
)
def test_dockerignore_keeps_out(path: str) -> None:
    assert dockerignored(path)


@pytest.mark.parametrize(
    "path",
    [
        "app.py",
        "train.py",
        "db.py",
        "utils.py",
        "model.py",
        "models/model.pth",
        "requirements.txt",
        ".streamlit/config.toml",
    ],
)
def test_dockerignore_keeps_what_the_image_needs(path: str) -> None:
    assert not dockerignored(path)


def test_streamlit_config_is_headless_without_usage_stats() -> None:
    config = tomllib.loads(STREAMLIT_CONFIG.read_text())
    assert config["server"]["headless"] is True
    assert config["browser"]["gatherUsageStats"] is False
    env = dockerfile_env()
    assert env.get("STREAMLIT_SERVER_FILE_WATCHER_TYPE") == "none"


# --------------------------------------------------------------------------------------------
# docker-compose.yml
# --------------------------------------------------------------------------------------------


def test_compose_services_are_exactly_app_db_migrate_train() -> None:
    assert set(services()) == {"app", "db", "migrate", "train"}


def test_db_is_postgres_17_with_named_volume_healthcheck_and_restart() -> None:
    compose = load_compose()
    db = compose["services"]["db"]
    assert db["image"] == "postgres:17"
    assert db["restart"] in ("unless-stopped", "always")
    (volume,) = short_volumes(db)
    assert volume[1] == "/var/lib/postgresql/data"
    assert volume[0] in compose["volumes"], "the database needs a named volume"
    test = db["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL" and "pg_isready" in test[1]
    assert "-h 127.0.0.1" in test[1], "socket-only init server must not count as ready"
    assert memory_limit(db) >= size_bytes("256m")


def test_db_is_not_published_on_a_public_interface() -> None:
    db = services()["db"]
    for port in db.get("ports", []):
        published = port if isinstance(port, str) else port.get("host_ip", "")
        assert str(published).startswith("127.0.0.1:"), f"db port exposed publicly: {port}"
    assert "network_mode" not in db


def test_app_waits_for_a_healthy_db_and_restarts() -> None:
    app = services()["app"]
    assert app["depends_on"]["db"]["condition"] == "service_healthy"
    assert app["restart"] == "unless-stopped"
    assert app["build"] in (".", {"context": "."})
    assert app.get("init") is True


def test_app_publishes_8501_with_memory_limit_and_readonly_models() -> None:
    app = services()["app"]
    (port,) = app["ports"]
    assert port.endswith(f":{CONTAINER_PORT}"), port
    assert 512 * 1024**2 <= memory_limit(app) <= 2 * 1024**3
    assert ("./models", "/app/models", "ro") in short_volumes(app)


def test_app_environment_always_points_at_the_compose_db() -> None:
    env = services()["app"]["environment"]
    assert env["POSTGRES_HOST"] == "db", "without it db.py would start an embedded PostgreSQL"
    assert "DATABASE_URL" not in env
    assert env["MODEL_PATH"] == "models/model.pth"


def test_the_app_never_gets_the_owners_password() -> None:
    app = services()["app"]
    assert "env_file" not in app, ".env holds POSTGRES_PASSWORD"
    assert not {"POSTGRES_PASSWORD", "POSTGRES_USER"} & set(app["environment"])
    assert app["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_app_healthcheck_in_compose_matches_the_image() -> None:
    check = services()["app"]["healthcheck"]
    assert check["test"][0] == "CMD"
    assert check["test"][1:] == healthcheck()[1]
    options = healthcheck()[0]
    for key in ("interval", "timeout", "start_period"):
        assert seconds(check[key]) == seconds(options[key.replace("_", "-")]), key
    assert check["retries"] == int(options["retries"])


def test_train_service_is_a_profile_with_shm_memory_and_mounts() -> None:
    compose = services()
    train, app = compose["train"], compose["app"]
    assert train["profiles"] == ["train"]
    assert train["image"] == app["image"] and train["build"] == app["build"]
    assert size_bytes(train["shm_size"]) >= 1024**3
    assert memory_limit(train) == 2 * 1024**3
    assert train["restart"].startswith("on-failure")
    volumes = short_volumes(train)
    assert ("./models", "/app/models", "rw") in volumes
    assert ("./data", "/app/data", "rw") in volumes
    assert seconds(train["stop_grace_period"]) >= 30, "time to save a checkpoint on SIGTERM"
    assert "ports" not in train


def test_train_command_downloads_mnist_into_the_mounted_data_dir() -> None:
    command = services()["train"]["command"]
    assert isinstance(command, list), "exec form: train.py must receive SIGTERM directly"
    assert command[:2] == ["python", "train.py"]
    assert "--download" in command
    assert command[command.index("--data-dir") + 1].startswith("data/")
    assert command[command.index("--out") + 1].startswith("models/")
    assert command[command.index("--checkpoint-dir") + 1].startswith("models/")


def test_no_literal_password_in_compose_files() -> None:
    for path in (COMPOSE, COMPOSE_HTTPS):
        for line in path.read_text().splitlines():
            match = re.search(r"(PASSWORD|SECRET|TOKEN)\w*\s*[:=]\s*(\S.*)", line, re.I)
            if match and not line.lstrip().startswith("#"):
                assert match[2].startswith(("${POSTGRES_PASSWORD:?", "${APP_DB_PASSWORD:?")), (
                    f"{path.name}: {line}"
                )
    compose = load_compose()
    for name, service in compose["services"].items():
        env = service.get("environment", {})
        assert isinstance(env, dict), f"{name}: use the mapping form for environment"
        if "POSTGRES_PASSWORD" in env:
            assert env["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    assert "POSTGRES_PASSWORD" not in compose["services"]["train"].get("environment", {})


def test_only_the_passwords_and_domain_are_required_variables() -> None:
    required = {"POSTGRES_PASSWORD", "APP_DB_PASSWORD"}
    assert {
        name for name, op in compose_variables(COMPOSE.read_text()).items() if op != ":-"
    } == required
    https = compose_variables(COMPOSE_HTTPS.read_text())
    assert {name for name, op in https.items() if op != ":-"} == {"DOMAIN"}


def test_interpolation_fails_clearly_without_password_and_defaults_apply() -> None:
    raw = load_compose()
    with pytest.raises(MissingVariable, match=r"POSTGRES_PASSWORD.*\.env"):
        interpolate(raw, {"APP_DB_PASSWORD": "app"})
    with pytest.raises(MissingVariable, match=r"APP_DB_PASSWORD.*\.env"):
        interpolate(raw, {"POSTGRES_PASSWORD": "s3cret"})
    secrets = {"POSTGRES_PASSWORD": "s3cret", "APP_DB_PASSWORD": "app"}
    resolved = interpolate(raw, secrets)
    app, db, migrate, train = (resolved["services"][n] for n in ("app", "db", "migrate", "train"))
    assert app["ports"] == [f"0.0.0.0:8501:{CONTAINER_PORT}"]
    assert migrate["environment"]["POSTGRES_PASSWORD"] == db["environment"]["POSTGRES_PASSWORD"]
    assert migrate["environment"]["POSTGRES_USER"] == db["environment"]["POSTGRES_USER"]
    assert app["environment"]["APP_DB_PASSWORD"] == migrate["environment"]["APP_DB_PASSWORD"]
    assert app["environment"]["POSTGRES_DB"] == db["environment"]["POSTGRES_DB"] == "postgres"
    assert train["user"] == "1000:1000"
    assert db["healthcheck"]["test"][1].count("${POSTGRES_USER}") == 1  # $$ -> for the shell
    private = interpolate(raw, {**secrets, "APP_BIND": "127.0.0.1"})
    assert private["services"]["app"]["ports"] == [f"127.0.0.1:8501:{CONTAINER_PORT}"]


def test_env_example_documents_every_variable_without_a_password() -> None:
    documented = env_example()
    used = set(compose_variables(COMPOSE.read_text())) | set(
        compose_variables(COMPOSE_HTTPS.read_text())
    )
    assert used <= set(documented), f"undocumented in .env.example: {used - set(documented)}"
    assert documented["POSTGRES_PASSWORD"] == "", ".env.example must not carry a password"
    lines = ENV_EXAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"\w+=", line):  # each block of variables has a comment above it
            j = i
            while j > 0 and re.match(r"\w+=", lines[j - 1]):
                j -= 1
            assert j > 0 and lines[j - 1].startswith("#"), f"no comment above {line!r}"


def test_env_is_gitignored_and_dockerignored() -> None:
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    assert dockerignored(".env")


def test_every_service_rotates_its_logs() -> None:
    for path in (COMPOSE, COMPOSE_HTTPS):
        for name, service in load_compose(path)["services"].items():
            if name == "app" and path == COMPOSE_HTTPS:
                continue  # only overrides the app's ports
            options = service["logging"]["options"]
            assert size_bytes(options["max-size"]) <= 100 * 1024**2, (path.name, name)
            assert int(options["max-file"]) >= 1, (path.name, name)


# --------------------------------------------------------------------------------------------
# docker-compose.https.yml + deploy/Caddyfile
# --------------------------------------------------------------------------------------------


def test_https_override_adds_caddy_and_unpublishes_the_app() -> None:
    override = load_compose(COMPOSE_HTTPS)
    assert set(override["services"]) == {"app", "caddy"}
    reset = override["services"]["app"]["ports"]
    assert isinstance(reset, Tagged) and reset.tag == "!reset" and reset.value == []
    caddy = override["services"]["caddy"]
    assert caddy["image"].startswith("caddy:2")
    assert caddy["restart"] == "unless-stopped"
    assert {"80:80", "443:443"} <= set(caddy["ports"])
    volumes = short_volumes(caddy)
    assert ("./deploy/Caddyfile", "/etc/caddy/Caddyfile", "ro") in volumes
    assert (
        {"caddy_data", "caddy_config"}
        <= {v[0] for v in volumes}
        <= (set(override["volumes"]) | {"./deploy/Caddyfile"})
    )
    assert caddy["environment"]["DOMAIN"].startswith("${DOMAIN:?")


def test_caddyfile_proxies_the_domain_to_the_app() -> None:
    text = CADDYFILE.read_text()
    assert re.search(r"^\{\$DOMAIN\}\s*\{", text, re.MULTILINE)
    assert re.search(rf"reverse_proxy\s+app:{CONTAINER_PORT}\b", text)


# --------------------------------------------------------------------------------------------
# The image's and compose's commands, executed on the host
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _host_env(**extra: str) -> dict[str, str]:
    """The environment the image gives its commands, on the host: the Dockerfile's ENV, the
    venv first on PATH, and no database settings inherited from the caller."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k != "DATABASE_URL" and not k.startswith(("POSTGRES_", "MNIST_"))
    }
    env.update({k: v for k, v in dockerfile_env().items() if k not in ("PATH", "HOME")})
    env["PATH"] = os.pathsep.join([str(VENV_BIN), env.get("PATH", "")])
    env.update(extra)
    return env


def _with_port(argv: list[str], port: int) -> list[str]:
    replaced = [a.replace(str(CONTAINER_PORT), str(port)) for a in argv]
    assert replaced != argv, f"{CONTAINER_PORT} not found in {argv}"
    return replaced


def _run_healthcheck(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


def test_image_cmd_comes_up_and_passes_its_healthcheck(fresh_pg_server, tmp_path: Path) -> None:
    port = _free_port()
    cmd = _with_port(image_cmd(), port)
    check = _with_port(healthcheck()[1], port)
    compose_check = _with_port(services()["app"]["healthcheck"]["test"][1:], port)
    env = _host_env(DATABASE_URL=fresh_pg_server.url)
    log_path = tmp_path / "app.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 120
        result = None
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"app exited {proc.returncode}:\n{log_path.read_text()}"
            result = _run_healthcheck(check, env)
            if result.returncode == 0:
                break
            time.sleep(1)
        assert result is not None and result.returncode == 0, (
            f"healthcheck never passed: {result and result.stderr[-2000:]}\n"
            f"{log_path.read_text()[-3000:]}"
        )
        assert _run_healthcheck(compose_check, env).returncode == 0
        time.sleep(1)
        assert proc.poll() is None, log_path.read_text()
    finally:
        _stop(proc)
    assert "Traceback" not in log_path.read_text(), log_path.read_text()


def _set_option(argv: list[str], option: str, value: str) -> list[str]:
    """Replace `option value` / `option=value` in argv, or append it."""
    out, i, found = [], 0, False
    while i < len(argv):
        if argv[i] == option:
            out += [option, value]
            i, found = i + 2, True
            continue
        if argv[i].startswith(option + "="):
            out.append(f"{option}={value}")
            found = True
        else:
            out.append(argv[i])
        i += 1
    return out if found else [*out, option, value]


def test_train_service_command_trains_a_model_on_the_host(tmp_path: Path) -> None:
    command = services()["train"]["command"]
    argv = command if isinstance(command, list) else shlex.split(command)
    data_dir, out, checkpoints = tmp_path / "mnist", tmp_path / "out" / "model.pth", tmp_path / "ck"
    copy_subset(data_dir)
    for option, value in (
        ("--data-dir", str(data_dir)),
        ("--out", str(out)),
        ("--checkpoint-dir", str(checkpoints)),
        ("--limit", "500"),
        ("--epochs", "1"),
    ):
        argv = _set_option(argv, option, value)
    shipped = ROOT / "models" / "model.pth"
    shipped_stat = shipped.stat().st_mtime_ns if shipped.exists() else None
    env = _host_env(**services()["train"].get("environment", {}))
    env = {k: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", v) for k, v in env.items()}  # compose defaults
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{argv}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert out.is_file() and out.stat().st_size > 0, result.stdout[-2000:]
    if shipped_stat is not None:
        assert shipped.stat().st_mtime_ns == shipped_stat, "the shipped model was overwritten"
