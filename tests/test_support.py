"""Test modules share code only through tests/support/: no module imports a test module (or
the conftest), so any test file can be run, moved or deleted on its own."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support import env

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (imports inside functions count too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: tests use absolute imports only
                names.add("." * node.level + (node.module or ""))
            elif node.module:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def forbidden(name: str) -> bool:
    if name.startswith("."):
        return True
    parts = name.split(".")
    return (
        parts[0] == "tests"
        and len(parts) > 1
        and (parts[1].startswith("test_") or parts[1] == "conftest")
    )


def test_no_module_imports_a_test_module_or_the_conftest() -> None:
    sources = [*TESTS.rglob("*.py"), *(REPO / "bench").rglob("*.py")]
    offenders = {
        f"{path.relative_to(REPO)}: {name}"
        for path in sources
        for name in imported_modules(path)
        if forbidden(name)
    }
    assert not offenders, "import from tests/support/ instead:\n" + "\n".join(sorted(offenders))


def test_the_check_sees_imports_at_any_depth(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from tests.support.ops import free_port\n"
        "def f():\n"
        "    from tests.test_bot import Harness\n"
        "    import tests.conftest\n"
        "    from . import helpers\n"
    )
    assert sorted(n for n in imported_modules(sample) if forbidden(n)) == [
        ".",
        "tests.conftest",
        "tests.test_bot",
        "tests.test_bot.Harness",
    ]


def test_each_parallel_test_process_has_a_redis_database_of_its_own_never_the_stacks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``./test.sh -n auto`` (pytest-xdist): test processes flush their Redis database before
    and after each test, so each needs its own, and none may be ``./run.sh``'s database 0."""
    url = "redis://127.0.0.1:6379/15"
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    assert env.per_process(url) == url
    seen = set()
    for n in range(15):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", f"gw{n}")
        seen.add(env.per_process(url))
    assert len(seen) == 15 and url in seen and "redis://127.0.0.1:6379/0" not in seen
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw15")
    with pytest.raises(RuntimeError, match="database 0"):
        env.per_process(url)
