"""The worker node installs and runs on its own: what a provider runs inside its TEE carries no
operator code (backend/, bot/, miniapp/) and none of the operator's dependencies.

Checked three ways: every module of ``workers`` imports in a fresh interpreter in which the
operator's packages cannot be imported at all, and ``cocoon-worker --help`` runs there; the
worker's lock file holds none of them; the worker image copies only ``workers/``.
"""

from __future__ import annotations

import fnmatch
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Import names of the operator's own packages and of the dependencies only it needs.
OPERATOR_ONLY = (
    "backend",
    "bot",
    "miniapp",
    "aiogram",
    "aiohttp_jinja2",
    "alembic",
    "asyncpg",
    "aiosqlite",
    "babel",
    "dcap_qvl",
    "jinja2",
    "pydantic_settings",
    "pytonconnect",
    "pytoniq_core",
    "sqlalchemy",
    "ton_core",
    "tonutils",
)
# Their distribution names, as a lock file spells them.
OPERATOR_DISTRIBUTIONS = (
    "aiogram",
    "aiohttp-jinja2",
    "alembic",
    "asyncpg",
    "aiosqlite",
    "babel",
    "dcap-qvl",
    "jinja2",
    "pydantic-settings",
    "pytonconnect",
    "pytoniq-core",
    "sqlalchemy",
    "ton-core",
    "tonutils",
)

PROBE = """
import importlib, importlib.abc, pkgutil, sys

BLOCKED = set(sys.argv[1].split(","))

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"the worker imported {name}, which a worker install does not have")
        return None

sys.meta_path.insert(0, Block())
import workers
names = [m.name for m in pkgutil.walk_packages(workers.__path__, "workers.")]
for name in names:
    importlib.import_module(name)
print("imported", len(names))
from workers.node import main
try:
    main(["--help"])
except SystemExit as stop:
    assert stop.code == 0, stop.code
"""


@pytest.mark.slow
def test_every_worker_module_imports_and_the_node_runs_without_the_operators_packages() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, ",".join(OPERATOR_ONLY)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    imported = int(re.search(r"imported (\d+)", result.stdout).group(1))
    assert imported >= 10  # the wire contract, the node and every engine module
    assert "--register-url" in result.stdout  # the node's own help


def test_the_worker_lock_holds_no_operator_dependency_and_agrees_with_the_dev_lock() -> None:
    def pins(name: str) -> dict[str, str]:
        text = (ROOT / "requirements" / name).read_text()
        return {
            m.group(1).lower().replace("_", "-"): m.group(2)
            for m in re.finditer(r"^([A-Za-z0-9_.-]+)==(\S+)", text, re.MULTILINE)
        }

    worker, operator, dev = pins("worker.lock"), pins("operator.lock"), pins("dev.lock")
    assert {"redis", "rq", "pynacl", "pydantic", "aiohttp"} <= worker.keys()
    assert not worker.keys() & set(OPERATOR_DISTRIBUTIONS)
    assert set(OPERATOR_DISTRIBUTIONS) <= operator.keys()
    for lock in (worker, operator):
        for name, version in lock.items():
            assert dev.get(name) == version, f"{name}: {version} here, {dev.get(name)} in dev.lock"


def test_the_worker_image_copies_only_the_worker() -> None:
    text = (ROOT / "deploy" / "worker.Dockerfile").read_text()
    copied = {
        s for line in re.findall(r"^COPY (.+) \S+$", text, re.MULTILINE) for s in line.split()
    }
    assert "workers" in copied
    assert not copied & {"backend", "bot", "miniapp", "locales", "requirements/dev.lock"}
    # It installs offline from the worker's wheelhouse, which scripts/wheels.sh builds from
    # requirements/worker.lock and the engine alone.
    assert "COPY build/wheels/worker-${ENGINE} /tmp/wheels" in text
    assert "pip install --find-links /tmp/wheels -r /tmp/wheels/requirements.txt" in text
    wheels = (ROOT / "scripts" / "wheels.sh").read_text()
    engines = re.findall(r"^\s+(worker-\w+)\) reqs=\((.+)\) ;;$", wheels, re.MULTILINE)
    assert {name for name, _ in engines} == {"worker-cpu", "worker-vllm"}
    for engine in engines:
        assert engine[1].startswith("-r requirements/worker.lock"), engine
    assert 'ENTRYPOINT ["cocoon-worker"]' in text


def test_the_workers_data_files_are_packaged() -> None:
    """A worker installed from its wheel has every file of ``workers/`` besides the code (the
    shipped chat templates, ``workers/templates/*.jinja``): package-data names each kind."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["packages"]["find"].get("namespaces", True)  # workers/templates has no __init__
    patterns = config["package-data"]["*"]
    data = [
        path
        for path in (ROOT / "workers").rglob("*")
        if path.is_file() and path.suffix not in {".py", ".pyc"} and "__pycache__" not in path.parts
    ]
    assert any(path.suffix == ".jinja" for path in data)
    for path in data:
        assert any(fnmatch.fnmatch(path.name, pattern) for pattern in patterns), path
