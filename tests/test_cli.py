"""The ``cocoon`` command as an operator uses it: a real process on a real SQLite file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SUBCOMMANDS = ["up", "web", "bot", "worker", "watcher", "chat", "db", "ledger"]


def cocoon(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COCOON_")}
    env["COCOON_DATA_DIR"] = str(data_dir)
    return subprocess.run(
        [sys.executable, "-m", "backend.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=data_dir.parent,
    )


def test_help_lists_every_subcommand(tmp_path: Path) -> None:
    result = cocoon(tmp_path / "data", "--help")
    assert result.returncode == 0
    for name in SUBCOMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize(
    "args",
    [[name] for name in SUBCOMMANDS]
    + [["db", "upgrade"], ["ledger", "credit"], ["ledger", "balance"]],
)
def test_every_subcommand_has_help(tmp_path: Path, args: list[str]) -> None:
    result = cocoon(tmp_path / "data", *args, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: cocoon")


def test_credit_then_balance(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert cocoon(data, "db", "upgrade").returncode == 0
    credit = cocoon(
        data,
        "ledger", "credit", "--telegram-id", "5001", "--amount", "2500000000",
        "--reason", "unclaimed deposit tx abc", "--key", "resolve:abc",
    )  # fmt: skip
    assert credit.returncode == 0, credit.stderr
    assert "2.5 GRAM" in credit.stdout

    again = cocoon(
        data,
        "ledger", "credit", "--telegram-id", "5001", "--amount", "2500000000",
        "--reason", "unclaimed deposit tx abc", "--key", "resolve:abc",
    )  # fmt: skip
    assert again.returncode == 0 and "nothing changed" in again.stdout

    balance = cocoon(data, "ledger", "balance", "--telegram-id", "5001")
    assert balance.returncode == 0, balance.stderr
    assert "available: 2500000000 nanoTON (2.5 GRAM)" in balance.stdout


@pytest.mark.parametrize("amount", ["-5", "1.5", "abc", "0", "99999999999999999999"])
def test_bad_amount_is_one_line_and_exit_2(tmp_path: Path, amount: str) -> None:
    data = tmp_path / "data"
    result = cocoon(
        data, "ledger", "credit", "--telegram-id", "5002", "--amount", amount, "--reason", "x"
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("cocoon: error: --amount")
    assert (
        not (data / "cocoon.db").exists()
        or "5002" not in cocoon(data, "ledger", "balance", "--telegram-id", "5002").stdout
    )


def test_balance_of_unknown_user(tmp_path: Path) -> None:
    data = tmp_path / "data"
    cocoon(data, "db", "upgrade")
    result = cocoon(data, "ledger", "balance", "--telegram-id", "6001")
    assert result.returncode == 1
    assert "no user with Telegram id 6001" in result.stderr


def test_db_upgrade_on_postgresql(tmp_path: Path, postgres_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COCOON_")}
    env["COCOON_DATABASE_URL"] = postgres_url
    result = subprocess.run(
        [sys.executable, "-m", "backend.cli", "db", "upgrade"],
        env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "postgresql" in result.stdout
    # Twice is harmless.
    again = subprocess.run(
        [sys.executable, "-m", "backend.cli", "db", "upgrade"],
        env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
