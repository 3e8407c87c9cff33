"""The production deployment files: compose.yaml is a valid Compose file whose commands are real
``cocoon`` commands, .env.example lists every setting (and nothing that is not one), the Redis
ACL file works on a real redis-server, and the Dockerfiles copy what exists."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from pydantic import BaseModel

from backend.cli import build_parser
from backend.settings import Settings
from tests.support.env import require_module
from tests.support.ops import free_port
from workers.metrics import METRICS_PORT_ENV
from workers.node import build_parser as worker_parser
from workers.node_cli import COALESCE_ENV

require_module("yaml")
require_module("jsonschema")

import jsonschema  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VARIABLE = re.compile(r"\$\{([A-Z0-9_]+)(?:(:?[-?])([^}]*))?\}")
EXAMPLE_LINE = re.compile(r"^#?\s?([A-Z][A-Z0-9_]*)=(.*)$")


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def example() -> dict[str, tuple[str, bool]]:
    """``{NAME: (value, set)}`` of .env.example (``set``: the line is not commented out)."""
    found = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if match := EXAMPLE_LINE.match(line):
            found[match[1]] = (match[2], not line.startswith("#"))
    return found


def setting_names(model: type[BaseModel] = Settings, prefix: str = "COCOON_") -> set[str]:
    """Environment names of every setting, nested models flattened with ``__``."""
    names = set()
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names |= setting_names(annotation, f"{prefix}{name.upper()}__")
        else:
            names.add(f"{prefix}{name.upper()}")
    return names


def interpolate(text: str, env: dict[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        name, op, arg = match[1], match[2], match[3]
        value = env.get(name, "")
        if op and op.endswith("-") and not value:
            return arg
        return value

    return VARIABLE.sub(one, text)


def test_compose_yaml_follows_the_compose_specification() -> None:
    schema = json.loads((ROOT / "deploy" / "compose-spec.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(compose()), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)

    # The schema is not a rubber stamp: a misspelt key is refused.
    broken = compose()
    broken["services"]["web"]["healtcheck"] = broken["services"]["web"].pop("healthcheck")
    assert not validator.is_valid(broken)


def test_the_stack_has_its_services_health_checks_volumes_and_a_gpu_worker() -> None:
    services = compose()["services"]
    assert {"redis", "postgres", "web", "bot", "watcher", "payouts", "worker"} <= set(services)
    for name in ("redis", "postgres", "web"):
        assert services[name]["healthcheck"]["test"], name
    assert "/healthz" in " ".join(services["web"]["healthcheck"]["test"])
    assert "--appendonly yes" in " ".join(services["redis"]["command"])
    assert "--aclfile" in " ".join(services["redis"]["command"])
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert services["worker"]["profiles"] == ["gpu"]
    for name in ("web", "bot", "watcher", "payouts"):
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    volumes = compose()["volumes"]
    assert {"redis-data", "postgres-data"} <= set(volumes)


def test_every_service_command_is_a_real_cocoon_command(capsys: pytest.CaptureFixture) -> None:
    env = {name: value for name, (value, _set) in example().items()}
    services = compose()["services"]
    for name in ("web", "bot", "watcher", "payouts"):
        command = [interpolate(part, env) for part in services[name]["command"]]
        assert command[0] == "cocoon", name
        args = build_parser().parse_args(command[1:])  # exits on an unknown command or option
        assert callable(args.handler)
    worker = [interpolate(part, env) for part in services["worker"]["command"]]
    args = worker_parser().parse_args(worker)
    assert args.engine == "vllm" and args.register_url and args.tee in ("auto", "tdx", "dev")


def test_env_example_lists_every_setting_and_only_settings() -> None:
    listed = example()
    compose_text = (ROOT / "compose.yaml").read_text()
    used_by_compose = {m[1] for m in VARIABLE.finditer(compose_text)}
    settings = setting_names()

    worker_node = {METRICS_PORT_ENV, COALESCE_ENV}  # the worker node's own, not the operator's
    cocoon = {name for name in listed if name.startswith("COCOON_")} - worker_node
    assert sorted(settings - cocoon) == [], "settings missing from .env.example"
    assert sorted(cocoon - settings) == [], ".env.example lists names that are not settings"
    others = {name for name in listed if not name.startswith("COCOON_")}
    assert sorted(others - used_by_compose) == [], "variables compose.yaml does not use"
    assert sorted(used_by_compose - set(listed)) == [], "compose variables missing"

    # Every listed line has its one-line meaning just above it.
    lines = (ROOT / ".env.example").read_text().splitlines()
    for index, line in enumerate(lines):
        if EXAMPLE_LINE.match(line):
            above = lines[index - 1]
            assert above.startswith("# ") and above[2:].strip(), f"no meaning for {line}"


def test_env_example_values_are_valid_settings(tmp_path: Path) -> None:
    """Uncommenting every line of .env.example gives settings Cocoon accepts."""
    text = (ROOT / ".env.example").read_text()
    uncommented = "\n".join(
        line[2:] if (line.startswith("# COCOON_") and "=" in line) else line
        for line in text.splitlines()
    )
    env_file = tmp_path / ".env"
    env_file.write_text(uncommented)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("COCOON_")}
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(clean)
    try:
        settings = Settings(_env_file=env_file)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert settings.ton.proof_domains == ["cocoon.example.org"]
    assert settings.web_port == 8080 and settings.hold_timeout_s == 900


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server binary")
def test_the_redis_acl_file_lets_the_operator_in_and_no_one_else(tmp_path: Path) -> None:
    """Render deploy/redis/users.acl as the compose service does, start a private redis-server
    with it, and check who gets in."""
    command = " ".join(compose()["services"]["redis"]["command"])
    assert "sed -e '/^#/d'" in command  # comment lines dropped: Redis refuses them
    acl = [
        line.replace("__REDIS_PASSWORD__", "s3cret")
        for line in (ROOT / "deploy" / "redis" / "users.acl").read_text().splitlines()
        if not line.startswith("#")
    ]
    (tmp_path / "users.acl").write_text("\n".join(acl) + "\n")
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--aclfile", str(tmp_path / "users.acl"),
         "--appendonly", "yes", "--dir", str(tmp_path), "--save", ""],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        operator = redis.Redis(port=port, username="cocoon", password="s3cret")
        deadline = time.monotonic() + 60  # an upper bound on redis-server's start
        while True:
            try:
                assert operator.ping()
                break
            except redis.ConnectionError:
                assert server.poll() is None, "redis-server refused the ACL file"
                assert time.monotonic() < deadline
                time.sleep(0.05)
        anonymous = redis.Redis(port=port)
        with pytest.raises(redis.AuthenticationError):
            anonymous.get("x")
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port, username="cocoon", password="wrong").ping()
        # The operator can give an attested worker a user of its own.
        operator.execute_command("ACL", "SETUSER", "cocoon-worker-0-w-1", "on", ">pw", "+ping")
        assert redis.Redis(port=port, username="cocoon-worker-0-w-1", password="pw").ping()
        for client in (operator, anonymous):
            client.close()
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert (tmp_path / "appendonlydir").exists()


def test_the_dockerfiles_copy_what_the_repository_has() -> None:
    """Every COPY source is in the repository, or made beforehand by the scripts that
    .ci/compose runs (the wheels, the Mini App's npm packages), which the build context lets in."""
    made = {
        "build/wheels/operator": "scripts/wheels.sh",
        "build/wheels/worker-${ENGINE}": "scripts/wheels.sh",
        "miniapp/node_modules": "scripts/bootstrap.sh",
    }
    for name in ("Dockerfile", "worker.Dockerfile"):
        text = (ROOT / "deploy" / name).read_text()
        assert text.startswith("#")
        # No registry needed: the base image is an argument (scripts/base-image.sh makes one).
        assert "ARG BASE_IMAGE=python:3.11-slim\nFROM ${BASE_IMAGE}\n" in text
        assert "PIP_NO_INDEX=1" in text  # nothing is downloaded inside `docker build`
        for sources in re.findall(r"^COPY (.+) \S+$", text, re.MULTILINE):
            for source in sources.split():
                if source in made:
                    assert (
                        made[source] in (ROOT / ".ci" / "compose").read_text()
                        or (ROOT / made[source]).exists()
                    )
                    continue
                assert (ROOT / source).exists(), f"{name} copies {source}, which is missing"
    assert "ARG ENGINE=vllm" in (ROOT / "deploy" / "worker.Dockerfile").read_text()


def test_the_build_context_is_only_what_the_images_copy() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    rules = [line for line in lines if line and not line.startswith("#")]
    assert rules[0] == "*", "everything is left out unless let in"
    let_in = {line[1:].rstrip("/") for line in rules if line.startswith("!")}
    assert not {".env", ".git", ".venv", "tests", "data"} & let_in
    for name in ("Dockerfile", "worker.Dockerfile"):
        text = (ROOT / "deploy" / name).read_text()
        for sources in re.findall(r"^COPY (.+) \S+$", text, re.MULTILINE):
            for source in sources.split():
                source = source.replace("${ENGINE}", "cpu")
                assert any(source == p or source.startswith(p + "/") for p in let_in), source


def test_every_container_logs_json_lines_and_rotates_them() -> None:
    services = compose()["services"]
    for name, service in services.items():
        logging = service["logging"]
        assert logging["driver"] == "json-file" and logging["options"]["max-size"], name
    for name in ("web", "bot", "watcher", "payouts", "worker"):
        assert services[name]["environment"]["COCOON_LOG_JSON"] == "true", name
