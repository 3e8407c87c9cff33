"""Where the tests' servers are, and what a missing one means: outside CI a test whose server
or optional package is missing is skipped; in CI (``CI=true``) it fails."""

from __future__ import annotations

import importlib.util
import os

import pytest

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def per_process(url: str) -> str:
    """``url`` for this test process: under pytest-xdist (``-n``) worker ``gwN`` uses the
    database N below the given one, so the processes never flush each other's keys. Never
    database 0 (``./run.sh``'s): more workers than that allows is an error, not a flush."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw"):
        return url
    base, _, db = url.rpartition("/")
    mine = int(db or 0) - int(worker[2:])
    if mine < 1:
        raise RuntimeError(
            f"test worker {worker} would flush Redis database {mine} below {url}: run fewer "
            "workers (-n) or start COCOON_TEST_REDIS_URL at a higher database"
        )
    return f"{base}/{mine}"


TEST_REDIS_URL = per_process(os.environ.get("COCOON_TEST_REDIS_URL", "redis://127.0.0.1:6379/15"))
TEST_POSTGRES_URL = os.environ.get(
    "COCOON_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)


def unavailable(what: str, error: Exception) -> None:
    """Skip (outside CI) or fail (in CI) the running test: ``what`` is not reachable."""
    message = f"{what} is not reachable: {error}"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def require_module(name: str) -> None:
    """Skip a test module whose optional dependency is missing, except in CI, where it fails."""
    if importlib.util.find_spec(name) is None:
        if IN_CI:
            pytest.fail(f"{name} is not installed: CI installs the 'cpu' extra", pytrace=False)
        pytest.skip(f"{name} is not installed", allow_module_level=True)
