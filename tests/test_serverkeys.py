"""No guessable keys, no key beside the data (issue 13, item 5): the context key lives in the
secrets directory, outside the data directory, and names of routes in Redis are keyed with a
secret derived from it (``backend/serverkeys.py``)."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest
from pydantic import SecretStr

from backend import serverkeys
from backend.settings import Settings
from backend.stack import _say_where_the_key_is


def test_the_context_key_is_made_once_outside_the_data_directory(settings: Settings) -> None:
    key = serverkeys.load_context_key(settings)
    path = serverkeys.context_key_file(settings)
    assert path.parent == settings.secrets_dir and len(key) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not (settings.data_dir / "context.key").exists()
    assert serverkeys.load_context_key(settings) == key
    assert not serverkeys.shares_data_dir(settings)


def test_an_older_key_in_the_data_directory_is_moved_out(settings: Settings) -> None:
    settings.data_dir.mkdir(parents=True)
    (settings.data_dir / "context.key").write_text("ab" * 32 + "\n")
    assert serverkeys.load_context_key(settings) == bytes.fromhex("ab" * 32)
    assert not (settings.data_dir / "context.key").exists()  # the old copy is gone
    assert serverkeys.context_key_file(settings).exists()


def test_cocoon_up_says_where_the_key_is_and_warns_beside_the_data(
    settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _say_where_the_key_is(settings)
    out = capsys.readouterr().out
    assert f"context key in {serverkeys.context_key_file(settings)}" in out
    assert "warning" not in out
    beside = settings.model_copy(update={"secrets_dir": settings.data_dir / "keys"})
    _say_where_the_key_is(beside)
    assert "warning: the context key is in the data folder" in capsys.readouterr().out


def test_route_names_are_keyed_not_a_hash_of_the_conversation(settings: Settings) -> None:
    conversation = "api-" + hashlib.sha256(b"1\0user\0hello").hexdigest()[:32]
    secret = serverkeys.route_secret(settings)
    name = serverkeys.route_id(secret, conversation)
    assert name.startswith("r-") and conversation[4:] not in name
    other = settings.model_copy(update={"secrets_dir": settings.data_dir.parent / "other"})
    assert serverkeys.route_id(serverkeys.route_secret(other), conversation) != name
    assert serverkeys.route_id(secret, conversation) == name  # stable: routes stick
    fixed = settings.model_copy(update={"context_key": SecretStr("cd" * 32)})
    assert serverkeys.route_secret(fixed) == serverkeys.route_secret(fixed)
    assert serverkeys.route_secret(fixed) != secret
