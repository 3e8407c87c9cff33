"""The Redis ACL user of one attested worker: exactly the keys its node needs, nothing else.

RQ's key layout decides what is possible. Every key of a job carries the job id, and Cocoon's job
ids start with the worker's id (:func:`workers.jobs.job_id_for`), so a worker's patterns cover its
own jobs only. No pattern covers a shared key: the worker index, slot reservations, RQ's global
worker set and every other worker's keys are the backend's. No script runs as a worker (no
``EVAL``/``EVALSHA``/``SCRIPT``/``FUNCTION``/``FCALL``: a script could block the server), and
``SELECT`` is allowed for the worker's own database only. The rules (``W`` = worker id, ``Q`` =
``cocoon:queue:W``, its RQ queue name) are listed in the README's "Attestation" section with what
such a user can still touch; the test ``tests/test_attest_acl.py`` pins them down against the
real server.

The user is created with the password's SHA-256 only (``#<hex>``); the backend keeps that digest
(:func:`backend.attestation.store.keep_acl_digest`) so that it can recreate the user, with the
same password, after a Redis restart or failover (:func:`restore_worker_user`).
"""

from __future__ import annotations

import hashlib
import re
import secrets

from redis.asyncio import Redis as AsyncRedis

from workers.registry import queue_name

USER_PREFIX = "cocoon-worker-"
DIGEST = re.compile(r"[0-9a-f]{64}")
ATTESTED_ID = re.compile(r"w-[0-9a-f]{16}")  # always with fullmatch
"""Attested worker ids (``w-`` + key fingerprint): no glob characters, no ``_``, fixed length,
so no worker's patterns can cover another worker's keys."""

COMMANDS = (
    # connection (SELECT: its own database only, see acl_rules)
    "hello", "auth", "ping", "quit", "client|setname", "client|getname", "client|id", "info",
    # transactions, clock (no scripts)
    "multi", "exec", "discard", "watch", "unwatch", "time",
    # keys
    "get", "mget", "exists", "del", "unlink", "expire", "pexpire", "expireat", "pexpireat",
    "ttl", "pttl", "persist", "type",
    # hashes
    "hget", "hmget", "hgetall", "hset", "hsetnx", "hmset", "hdel", "hexists", "hincrby",
    "hincrbyfloat", "hkeys", "hlen",
    # lists (the queue)
    "llen", "lrange", "lindex", "lpos", "lpush", "rpush", "lpop", "rpop", "lrem", "lmove",
    "blmove", "rpoplpush", "brpoplpush", "blpop", "brpop",
    # sets and sorted sets (RQ registries)
    "sadd", "srem", "smembers", "sismember", "scard", "zadd", "zrem", "zscore", "zcard",
    "zcount", "zrange", "zrangebyscore", "zrevrangebyscore", "zremrangebyscore",
    # streams (the job's reply, RQ's results)
    "xadd", "xtrim", "xrange", "xrevrange", "xlen",
    # the cancel channel, listen only
    "subscribe", "unsubscribe",
)  # fmt: skip


def user_name(worker_id: str, db: int = 0) -> str:
    """``cocoon-worker-<db>-<worker_id>``: ACL users are server-wide, records are per database."""
    return f"{USER_PREFIX}{db}-{worker_id}"


def _db(redis: AsyncRedis) -> int:
    return int(redis.connection_pool.connection_kwargs.get("db", 0) or 0)


def is_attested_id(worker_id: object) -> bool:
    return isinstance(worker_id, str) and ATTESTED_ID.fullmatch(worker_id) is not None


def key_patterns(worker_id: str) -> list[str]:
    """The key permissions of a worker's user (``~`` read-write, ``%R~`` read-only)."""
    if not is_attested_id(worker_id):
        raise ValueError(f"not an attested worker id: {worker_id!r}")
    w, q = worker_id, queue_name(worker_id)
    return [
        # Cocoon: its own registry entry, its jobs' streams and cancels
        f"~cocoon:worker:{w}", f"~cocoon:stream:{w}_*", f"%R~cocoon:cancel:{w}_*",
        # RQ: its queue and the queue's registries
        f"~rq:queue:{q}", f"~rq:queue:{q}:intermediate", f"~rq:wip:{q}", f"~rq:finished:{q}",
        f"~rq:failed:{q}", f"~rq:canceled:{q}", f"~rq:deferred:{q}", f"~rq:scheduled:{q}",
        # RQ: its jobs, their results and executions
        f"~rq:job:{w}_*", f"~rq:job::{w}_*", f"~rq:results:{w}_*", f"~rq:execution:{w}_*",
        f"~rq:executions:{w}_*",
        # RQ: itself as an RQ worker (listed in its queue's worker set, not the global one)
        f"~rq:worker:{w}", f"~rq:workers:{q}", "%R~rq:suspended",
    ]  # fmt: skip


def password_digest(password: str) -> str:
    """What Redis stores of a password, and what the backend keeps: SHA-256, hex."""
    return hashlib.sha256(password.encode()).hexdigest()


def acl_rules(worker_id: str, digest: str, db: int = 0) -> list[str]:
    """The full ``ACL SETUSER`` rule list, the password given as its SHA-256 (``digest``)."""
    if not DIGEST.fullmatch(digest):
        raise ValueError("not a SHA-256 password digest")
    return [
        "reset",
        "on",
        f"#{digest}",
        "resetchannels",
        "&cocoon:cancel",
        "-@all",
        *(f"+{command}" for command in COMMANDS),
        f"+select|{int(db)}",
        *key_patterns(worker_id),
    ]


def new_password() -> str:
    return secrets.token_urlsafe(32)


async def create_worker_user(redis: AsyncRedis, worker_id: str) -> tuple[str, str]:
    """Create (or replace) the worker's user with a new password; returns (user, password)."""
    password = new_password()
    name = await restore_worker_user(redis, worker_id, password_digest(password))
    return name, password


async def restore_worker_user(redis: AsyncRedis, worker_id: str, digest: str) -> str:
    """(Re)create the worker's user with the password whose SHA-256 is ``digest``."""
    db = _db(redis)
    name = user_name(worker_id, db)
    await redis.execute_command("ACL", "SETUSER", name, *acl_rules(worker_id, digest, db))
    return name


async def user_digest(redis: AsyncRedis, worker_id: str) -> str | None:
    """The SHA-256 of the worker user's password, as Redis holds it (None: no such user)."""
    reply = await redis.execute_command("ACL", "GETUSER", user_name(worker_id, _db(redis)))
    if reply is None:
        return None
    fields = reply if isinstance(reply, dict) else dict(zip(reply[::2], reply[1::2], strict=True))
    for key, value in fields.items():
        if (key.decode() if isinstance(key, bytes) else key) == "passwords" and value:
            first = value[0]
            return first.decode() if isinstance(first, bytes) else str(first)
    return None


async def user_exists(redis: AsyncRedis, worker_id: str) -> bool:
    return (
        await redis.execute_command("ACL", "GETUSER", user_name(worker_id, _db(redis))) is not None
    )


async def delete_worker_user(redis: AsyncRedis, worker_id: str) -> bool:
    """Delete the worker's user; Redis disconnects its clients at once. True if it existed."""
    return bool(await redis.execute_command("ACL", "DELUSER", user_name(worker_id, _db(redis))))


async def worker_users(redis: AsyncRedis) -> list[str]:
    """Worker ids that have an ACL user for this client's database."""
    prefix = user_name("", _db(redis))
    names = await redis.execute_command("ACL", "USERS")
    ids = []
    for name in names:
        text = name.decode() if isinstance(name, bytes) else str(name)
        if text.startswith(prefix) and is_attested_id(text[len(prefix) :]):
            ids.append(text[len(prefix) :])
    return ids
