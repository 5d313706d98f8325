"""docker-compose.yml's wiring, read with PyYAML and interpolated with .env.example as Compose would (no Docker
engine here): devices, settings, start order, commands the CLI really accepts, and no credentials in the file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from sqlalchemy.engine import make_url

REPO_ROOT = Path(__file__).resolve().parents[1]
COMPOSE_TEXT = (REPO_ROOT / "docker-compose.yml").read_text()
COMPOSE = yaml.safe_load(COMPOSE_TEXT)
SERVICES: dict[str, dict] = COMPOSE["services"]
WORKERS = {name: svc for name, svc in SERVICES.items() if name.startswith("worker-")}
FARM_SERVICES = ("api", "migrate", "flower", *WORKERS)
VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")
SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|AUTH|ACCESS_KEY", re.I)


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as Compose reads them (comments, blank lines, single- or double-quoted values)."""
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition("=")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


ENV_EXAMPLE = read_env_file(REPO_ROOT / ".env.example")


def interpolate(value, env: dict[str, str]):
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} and $$, applied to every string in a loaded document."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        current = env.get(name)
        if op in (":-", "-"):
            return current if current else arg
        if op in (":?", "?") and not current:
            raise ValueError(f"{name}: {arg}")
        return current or ""

    parts = value.split("$$")
    return "$".join(VAR.sub(one, part) for part in parts)


RESOLVED = interpolate(COMPOSE, ENV_EXAMPLE)


def environment(service: str, resolved: bool = True) -> dict[str, str]:
    env = (RESOLVED if resolved else COMPOSE)["services"][service].get("environment", {})
    assert isinstance(env, dict), f"{service}: write environment as a mapping"
    return {k: str(v) for k, v in env.items()}


def strings(node, path=()):
    """(path, string) for every string in the document (keys too)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield path + (k,), str(k)
            yield from strings(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from strings(v, path + (i,))
    elif isinstance(node, str):
        yield path, node


# ------------------------------------------------------------------ devices


def _gpus_option(command: list[str]) -> list[int]:
    assert "--gpus" in command, command
    return [int(i) for i in command[command.index("--gpus") + 1].split(",")]


def test_every_worker_is_reserved_its_own_gpu_and_uses_exactly_it():
    assert {"worker-gpu0", "worker-gpu1"} <= set(WORKERS)
    seen_ids, hostnames = [], set()
    for name, svc in WORKERS.items():
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1, name
        device = devices[0]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"], name
        assert "count" not in device, f"{name}: give device_ids, not a count (a count takes any free GPU)"
        ids = device["device_ids"]
        assert ids and all(isinstance(i, str) and i.isdigit() for i in ids), name
        seen_ids += ids
        # Inside the container the reserved GPUs are numbered from 0: the worker must use exactly those.
        local = list(range(len(ids)))
        assert _gpus_option(svc["command"]) == local, name
        env = environment(name)
        assert env["CUDA_VISIBLE_DEVICES"] == ",".join(map(str, local)), name
        assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        assert "utility" in env["NVIDIA_DRIVER_CAPABILITIES"]  # nvidia-smi, which device discovery uses
        assert svc["hostname"] not in hostnames, "worker names in Flower come from the hostname"
        hostnames.add(svc["hostname"])
        assert svc["build"]["target"] == "worker"
        assert svc["shm_size"]
    assert len(seen_ids) == len(set(seen_ids)), f"a GPU is reserved twice: {seen_ids}"
    assert sorted(seen_ids) == ["0", "1"]


def test_the_api_refuses_jobs_bigger_than_any_worker():
    biggest = max(len(svc["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"])
                  for svc in WORKERS.values())
    assert int(environment("api")["FARM_MAX_GROUP_SIZE"]) == biggest


# ------------------------------------------------------------------ settings


def _settings_for(service: str, monkeypatch):
    from farm.settings import FarmSettings

    for key in list(__import__("os").environ):
        if key.startswith("FARM_"):
            monkeypatch.delenv(key)
    for key, value in environment(service).items():
        monkeypatch.setenv(key, value)
    return FarmSettings()


@pytest.mark.parametrize("service", ["api", *WORKERS])
def test_api_and_workers_reach_the_same_catalog_broker_and_store(service, monkeypatch):
    from farm.store import open_store

    env = environment(service)
    for key in ("FARM_DATABASE_URL", "FARM_BROKER_URL", "FARM_STORE_URL", "FARM_S3_ENDPOINT_URL",
                "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env.get(key), f"{service} lacks {key}"
    settings = _settings_for(service, monkeypatch)

    db = make_url(settings.database_url)
    assert db.drivername == "postgresql+psycopg" and db.host == "postgres" and db.host in SERVICES
    assert (db.username, db.password, db.database) == (
        ENV_EXAMPLE["POSTGRES_USER"], ENV_EXAMPLE["POSTGRES_PASSWORD"], ENV_EXAMPLE["POSTGRES_DB"])
    broker = make_url(settings.broker_url)
    assert broker.host == "redis" and broker.port == 6379 and broker.password == ENV_EXAMPLE["REDIS_PASSWORD"]
    assert settings.store_url.startswith(f"s3://{ENV_EXAMPLE['FARM_BUCKET']}/")
    assert settings.s3_endpoint_url == ENV_EXAMPLE["FARM_S3_ENDPOINT_URL"]
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (
        ENV_EXAMPLE["FARM_S3_ACCESS_KEY"], ENV_EXAMPLE["FARM_S3_SECRET_KEY"])
    open_store(settings.store_url, settings)  # the store URL and endpoint are ones the farm accepts
    # Every service a URL names is part of the stack
    assert {db.host, broker.host} <= set(SERVICES)


def test_each_service_gets_its_own_settings(monkeypatch):
    api = _settings_for("api", monkeypatch)
    assert set(api.api_tokens) == {"alice"}
    assert environment("migrate").keys() >= {"FARM_DATABASE_URL"}
    flower = _settings_for("flower", monkeypatch)
    assert make_url(flower.broker_url).host == "redis"
    assert flower.flower_basic_auth.get_secret_value() == ENV_EXAMPLE["FARM_FLOWER_BASIC_AUTH"]
    # Redis requires the very password the farm's services use; MinIO's bucket job makes the farm's key.
    redis_command = RESOLVED["services"]["redis"]["command"]
    assert redis_command[redis_command.index("--requirepass") + 1] == ENV_EXAMPLE["REDIS_PASSWORD"]
    bucket = environment("bucket")
    assert bucket["FARM_S3_ACCESS_KEY"] == environment("api")["AWS_ACCESS_KEY_ID"]
    script = "\n".join(COMPOSE["services"]["bucket"]["entrypoint"])
    assert 'mc mb --ignore-existing "local/$$FARM_BUCKET"' in script
    assert 'mc admin user add local "$$FARM_S3_ACCESS_KEY" "$$FARM_S3_SECRET_KEY"' in script


# ------------------------------------------------------------------ start order


def _depends(service: str) -> dict[str, str]:
    deps = SERVICES[service].get("depends_on", {})
    assert isinstance(deps, dict), f"{service}: depends_on needs conditions"
    return {name: spec["condition"] for name, spec in deps.items()}


def test_migration_and_bucket_complete_before_the_api_and_workers_start():
    assert _depends("migrate") == {"postgres": "service_healthy"}
    assert _depends("bucket") == {"minio": "service_healthy"}
    for one_shot in ("migrate", "bucket"):
        assert SERVICES[one_shot]["restart"] == "no"
    for service in ("api", *WORKERS):
        deps = _depends(service)
        assert deps["migrate"] == "service_completed_successfully", service
        assert deps["bucket"] == "service_completed_successfully", service
        assert deps["redis"] == "service_healthy", service
    assert _depends("flower") == {"redis": "service_healthy"}

    # Every "healthy" condition waits on a service that has a healthcheck, and nothing waits in a circle.
    order, done = [], set()

    def visit(name, stack=()):
        assert name not in stack, f"dependency cycle: {stack + (name,)}"
        if name in done:
            return
        for dep, condition in (_depends(name) if SERVICES[name].get("depends_on") else {}).items():
            assert dep in SERVICES, f"{name} depends on unknown {dep}"
            if condition == "service_healthy":
                assert "healthcheck" in SERVICES[dep], f"{dep} has no healthcheck for {name} to wait on"
            visit(dep, stack + (name,))
        done.add(name)
        order.append(name)

    for name in SERVICES:
        visit(name)
    assert order.index("migrate") < order.index("api") and order.index("postgres") < order.index("migrate")


# ------------------------------------------------------------------ commands and images


def _cli_parses(argv: list[str]) -> dict:
    """Parse `farm ...` with the real CLI (no command runs); returns the subcommand's parameters."""
    import typer

    from farm.cli.main import app

    assert argv[0] == "farm"
    group = typer.main.get_command(app)
    node, args = group, argv[1:]
    while hasattr(node, "get_command") and args and args[0] in getattr(node, "commands", {}):
        ctx = node.make_context(node.name or "farm", [args[0]], resilient_parsing=True)
        node, args = node.get_command(ctx, args[0]), args[1:]
    ctx = node.make_context(node.name, list(args))
    return ctx.params


def test_service_commands_are_ones_the_cli_accepts_and_ports_line_up():
    assert _cli_parses(SERVICES["migrate"]["command"]) == {"revision": "head"}
    api = _cli_parses(SERVICES["api"]["command"])
    assert api == {"host": "0.0.0.0", "port": 8000}
    assert RESOLVED["services"]["api"]["ports"] == [f"{ENV_EXAMPLE['FARM_API_PORT']}:{api['port']}"]
    assert f"127.0.0.1:{api['port']}/healthz" in " ".join(SERVICES["api"]["healthcheck"]["test"])
    for name, svc in WORKERS.items():
        assert _cli_parses(svc["command"])["gpus"] == ",".join(map(str, _gpus_option(svc["command"])))

    from farm.flower import build_parser

    command = SERVICES["flower"]["command"]
    assert command[:3] == ["python", "-m", "farm.flower"]
    flower = build_parser().parse_args(command[3:])
    assert flower.address == "0.0.0.0" and not flower.no_auth
    assert RESOLVED["services"]["flower"]["ports"] == [f"{ENV_EXAMPLE['FLOWER_PORT']}:{flower.port}"]


def test_dockerfile_installs_torch_before_the_project_and_keeps_it_out_of_the_service_image():
    text = (REPO_ROOT / "Dockerfile").read_text()
    stages = {m["name"]: m.start() for m in re.finditer(r"^FROM (?P<image>\S+)(?: AS (?P<name>\S+))?", text, re.M)}
    assert re.search(r"^FROM python:3\.11-slim AS base$", text, re.M)
    worker = text[stages["worker"]:]
    service = text[stages["service"]:stages["worker"]]
    torch_at = worker.index('pip install "torch==')
    project_at = worker.index('pip install ".[worker]"')
    assert torch_at < project_at
    assert "torch" not in service and "pip install ." in service
    for svc in SERVICES.values():
        if "build" in svc:
            assert svc["build"]["target"] in stages
    ignored = (REPO_ROOT / ".dockerignore").read_text().split()
    assert ".env" in ignored and ".venv" in ignored  # no secrets or local venv in the build context


# ------------------------------------------------------------------ secrets


def test_the_compose_file_holds_no_credentials_only_env_references():
    referenced = {m["name"] for m in VAR.finditer(COMPOSE_TEXT)}
    assert referenced <= set(ENV_EXAMPLE), f"not in .env.example: {sorted(referenced - set(ENV_EXAMPLE))}"
    assert not re.search(r"(?<!\$)\$(?!\$|\{)[A-Za-z_]", COMPOSE_TEXT.replace("$$", "")), "use ${VAR} or $$VAR"

    secret_vars = {k for k in ENV_EXAMPLE if SECRET_KEY.search(k)}
    for path, text in strings(COMPOSE):
        key = str(path[-1])
        if isinstance(path[-1], str) and SECRET_KEY.search(key) and text != key:
            bare = VAR.sub("", text)
            assert not bare.strip(), f"{'.'.join(map(str, path))}: a literal credential {text!r}; use ${{VAR}}"
        for match in re.finditer(r"://(?P<user>[^:@/\s]*):(?P<password>[^@/\s]*)@", text):
            assert VAR.fullmatch(match["password"]), f"{'.'.join(map(str, path))}: password in a URL must be ${{VAR}}"
        for match in VAR.finditer(text):
            if match["name"] in secret_vars and match["name"] != "HF_TOKEN":  # HF_TOKEN is optional
                name = match["name"]
                assert match["op"] == ":?", f"{name} must be required (${{{name}:?...}}), not defaulted"
    for key in secret_vars:
        assert not ENV_EXAMPLE[key] or ENV_EXAMPLE[key] not in COMPOSE_TEXT, \
            f"the example value of {key} is written in the compose file"
    for key, value in ENV_EXAMPLE.items():
        if SECRET_KEY.search(key) and key not in ("FARM_S3_ACCESS_KEY", "HF_TOKEN"):
            assert "CHANGE-ME" in value, f".env.example's {key} must be a placeholder"
    assert ".env" in (REPO_ROOT / ".gitignore").read_text().split()
