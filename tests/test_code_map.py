"""The README's code map stays true: it names every module of the four packages once, and
nothing that is not there; the layering it describes is the one ``lint-imports`` checks."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("backend", "bot", "miniapp", "workers")


def code_map() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"^## Code map\n(.*?)(?=^## )", text, re.MULTILINE | re.DOTALL)
    assert match, "README.md has no '## Code map' section"
    return match.group(1)


def modules_on_disk() -> set[str]:
    found = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            relative = path.relative_to(ROOT)
            if "migrations" in relative.parts[:2] and relative.parts[1:2] == ("migrations",):
                continue  # Alembic's env and revisions: named as one line, the folder
            if path.name == "__init__.py" and path.stat().st_size < 400:
                continue  # a package marker (or its __all__): the package is named instead
            found.add(relative.as_posix())
    return found


def test_the_code_map_names_every_module_once_and_only_modules_that_exist() -> None:
    named = re.findall(r"^- `([a-z0-9_/]+\.py)`", code_map(), re.MULTILINE)
    counts = Counter(named)
    assert not [n for n, c in counts.items() if c > 1], "named twice"
    missing = sorted(modules_on_disk() - set(named))
    assert not missing, f"modules the README's code map does not name: {missing}"
    stale = sorted(n for n in named if not (ROOT / n).is_file())
    assert not stale, f"the code map names modules that do not exist: {stale}"


@pytest.mark.skipif(
    shutil.which("lint-imports") is None
    and not Path(sys.executable).with_name("lint-imports").exists(),
    reason="import-linter is not installed (the dev extra)",
)
def test_the_import_contracts_hold() -> None:
    tool = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(tool) if tool.exists() else "lint-imports", "--no-cache"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "BROKEN" not in result.stdout
