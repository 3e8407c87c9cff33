"""``cocoon db backup FILE`` / ``cocoon db restore FILE``: a consistent copy of the database of
record, and its way back.

- PostgreSQL: ``pg_dump --format=custom`` (one consistent snapshot, taken while the services
  run) and ``pg_restore --single-transaction --no-owner`` (all or nothing). The connection is
  handed to them in libpq's environment (``PGPASSWORD`` and friends), never on a command line
  another user could read in ``ps``.
- SQLite: the SQLite online backup API (``sqlite3.Connection.backup``): a consistent copy,
  page by page, while other connections read and write; restoring copies the file back the
  same way.

A restore goes into an empty database (a fresh one, made by the operator) unless ``--clean``
says to drop what is there first; a file of one engine is refused by the other. After a restore
the ledger's invariants are checked (``backend.invariants``) and the command fails when they do
not hold.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

from sqlalchemy.engine import URL, make_url

from backend.db import is_sqlite

__all__ = ["BackupError", "backup", "file_kind", "restore"]

SQLITE_MAGIC = b"SQLite format 3\x00"
PG_MAGIC = b"PGDMP"


class BackupError(Exception):
    """A backup or restore that could not be done; the message says why, with no secret."""


def file_kind(path: Path) -> str:
    """``"sqlite"`` or ``"postgresql"``: which engine wrote the backup ``path``."""
    try:
        with path.open("rb") as file:
            head = file.read(len(SQLITE_MAGIC))
    except OSError as error:
        raise BackupError(f"cannot read {path}: {error.strerror}") from None
    if head.startswith(SQLITE_MAGIC):
        return "sqlite"
    if head.startswith(PG_MAGIC):
        return "postgresql"
    raise BackupError(f"{path} is neither a SQLite database nor a pg_dump custom-format archive")


def backup(db_url: str, path: Path) -> None:
    """Write a consistent copy of the database at ``db_url`` to ``path`` (not overwritten)."""
    if path.exists():
        raise BackupError(f"{path} exists already; choose a new file")
    if is_sqlite(db_url):
        source = _sqlite_path(db_url)
        if not source.exists():
            raise BackupError(f"there is no SQLite database at {source}")
        _sqlite_copy(source, path)
        return
    _run_pg(["pg_dump", "--format=custom", "--no-owner", f"--file={path}"], db_url)


def restore(db_url: str, path: Path, *, clean: bool = False) -> None:
    """Restore the backup ``path`` into the database at ``db_url``: an empty one, or any with
    ``clean`` (its tables are dropped first)."""
    kind = file_kind(path)
    if is_sqlite(db_url):
        if kind != "sqlite":
            raise BackupError(f"{path} is a PostgreSQL backup; restore it into PostgreSQL")
        target = _sqlite_path(db_url)
        if _sqlite_has_tables(target) and not clean:
            raise BackupError(f"{target} has tables already; restore with --clean to replace them")
        target.parent.mkdir(parents=True, exist_ok=True)
        _sqlite_copy(path, target)
        return
    if kind != "postgresql":
        raise BackupError(f"{path} is a SQLite backup; restore it into SQLite")
    command = ["pg_restore", "--single-transaction", "--no-owner", "--exit-on-error"]
    if clean:
        command += ["--clean", "--if-exists"]
    _run_pg([*command, str(path)], db_url, database_flag=True)


# ----------------------------------------------------------------------------- SQLite


def _sqlite_path(db_url: str) -> Path:
    database = make_url(db_url).database
    if not database or database == ":memory:":
        raise BackupError("an in-memory SQLite database has nothing to back up or restore")
    return Path(database)


def _sqlite_has_tables(path: Path) -> bool:
    if not path.exists():
        return False
    connection = sqlite3.connect(path)
    try:
        count: int = connection.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        return count > 0
    finally:
        connection.close()


def _sqlite_copy(source: Path, target: Path) -> None:
    """SQLite's online backup of ``source`` into ``target``, page by page."""
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    try:
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)
        finally:
            dst.close()
    except sqlite3.Error as error:
        raise BackupError(f"SQLite backup failed: {error}") from None
    finally:
        src.close()


# ------------------------------------------------------------------------- PostgreSQL


def _pg_env(url: URL) -> dict[str, str]:
    """libpq's environment for ``url``: the password travels here, not on the command line."""
    env = dict(os.environ)
    for name, value in (
        ("PGHOST", url.host),
        ("PGPORT", url.port),
        ("PGUSER", url.username),
        ("PGPASSWORD", url.password),
        ("PGDATABASE", url.database),
    ):
        if value is not None:
            env[name] = str(value)
    return env


def _run_pg(command: list[str], db_url: str, *, database_flag: bool = False) -> None:
    url = make_url(db_url)
    if url.get_backend_name() != "postgresql":
        raise BackupError(f"backups of {url.get_backend_name()} are not supported")
    if shutil.which(command[0]) is None:
        raise BackupError(f"{command[0]} is not installed (PostgreSQL's client tools)")
    if database_flag and url.database:
        command = [*command[:-1], f"--dbname={url.database}", command[-1]]
    result = subprocess.run(command, env=_pg_env(url), capture_output=True, text=True, check=False)
    if result.returncode != 0:
        # pg_dump's messages name the server and the database, never the password.
        raise BackupError(f"{command[0]} failed: {result.stderr.strip()[-2000:]}")
