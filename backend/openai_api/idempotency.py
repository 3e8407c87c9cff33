"""``Idempotency-Key``: a request sent again with the same key (an SDK's retry after a timeout)
gets the first request's result instead of running, and being billed, again.

The first request with a key claims it in Redis (``SET NX``) for as long as a turn can run; its
completion, once known, is kept for ``COCOON_API_IDEMPOTENCY_TTL_S``. A repeat with the same key
and the same body waits for the first to end and answers with its result (header
``Idempotent-Replayed: true``); one that waited its bound in vain is a 409 with
``Retry-After`` (the ``openai`` SDKs retry a 409 by themselves); the same key with another body
is a 400. A first request that failed (no worker, a timeout: nothing billed) gives its key
back, so a retry runs.

Nothing readable at rest: the kept completion (it holds the reply text) is sealed with a key
derived from the API key and the idempotency key, which only the client holds, and the body is
compared by a MAC under that key; the Redis key's name is a MAC too. Keys are per user.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import nacl.exceptions
import nacl.secret
import nacl.utils
from redis.asyncio import Redis as AsyncRedis

from backend.errors import ErrorCode
from backend.openai_api.protocol import ApiError
from workers.redis_keys import redis_key

HEADER = "Idempotency-Key"
IDEMPOTENCY = "api:idem"  # cocoon:api:idem:<user id>:<MAC of the key>: hash, sealed result
MAX_KEY_CHARS = 255
POLL_S = 0.2
RETRY_AFTER_S = 1  # a 409's Retry-After: the SDKs retry a 409, waiting this long first

_RUNNING = b"running"
_DONE = b"done"


def parse_key(value: str | None) -> str | None:
    """The header's key, or None without one; a 400 naming the header for a bad one."""
    if value is None:
        return None
    key = value.strip()
    if not key or len(key) > MAX_KEY_CHARS or not key.isascii() or not key.isprintable():
        raise ApiError(
            ErrorCode.INVALID_REQUEST,
            f"{HEADER} must be 1 to {MAX_KEY_CHARS} printable ASCII characters",
            param=HEADER,
        )
    return key


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True)
class Replay:
    """A kept result: the HTTP status and JSON body the first request answered with."""

    status: int
    body: dict[str, Any]


class IdempotencyKey:
    """One request's claim on its key. ``begin()`` either claims it (None: run the turn, then
    ``finish()`` or ``abandon()``) or returns the first request's :class:`Replay`."""

    def __init__(
        self,
        redis: AsyncRedis,
        user_id: int,
        api_key: str,
        key: str,
        body: bytes,
        *,
        ttl_s: int,
        running_ttl_s: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        secret = hashlib.blake2b(
            api_key.encode() + b"\0" + key.encode(), digest_size=32, person=b"cocoon-idem-key"
        ).digest()
        self._box = nacl.secret.SecretBox(secret)
        self._mac = hashlib.blake2b(body, digest_size=32, key=secret, person=b"cocoon-idem-body")
        name = hashlib.blake2b(key.encode(), digest_size=16, key=secret, person=b"cocoon-idem-nm")
        self.redis = redis
        self.name = redis_key(IDEMPOTENCY, str(user_id), name.hexdigest())
        self.ttl_s = ttl_s
        self.running_ttl_s = running_ttl_s
        self.clock = clock

    async def begin(self, wait_s: float) -> Replay | None:
        """Claim the key (None), or the first request's result, waiting up to ``wait_s`` for
        it to end; a 409 when it is still running then, a 400 when its body was another."""
        mac = self._mac.hexdigest()
        deadline = self.clock() + wait_s
        while True:
            claimed = await self.redis.hsetnx(self.name, "state", _RUNNING)
            if claimed:
                await self.redis.hset(self.name, "mac", mac)
                await self.redis.expire(self.name, self.running_ttl_s)
                return None
            state, first_mac, sealed = await self.redis.hmget(self.name, "state", "mac", "result")
            if state is None:
                continue  # expired or given back between the two calls: claim it again
            if first_mac is not None and _text(first_mac) != mac:
                raise ApiError(
                    ErrorCode.INVALID_REQUEST,
                    f"this {HEADER} was used with another request body; use a new key",
                    param=HEADER,
                )
            if state == _DONE and isinstance(sealed, bytes):
                return self._open(sealed)
            if self.clock() >= deadline:
                raise ApiError(
                    ErrorCode.INVALID_REQUEST,
                    f"a request with this {HEADER} is still running; try again later",
                    param=HEADER,
                    status=409,
                    retry_after=RETRY_AFTER_S,
                )
            await asyncio.sleep(POLL_S)

    async def finish(self, status: int, body: dict[str, Any]) -> None:
        """Keep the result for the window (sealed)."""
        plain = json.dumps({"status": status, "body": body}).encode()
        sealed = self._box.encrypt(plain, nacl.utils.random(nacl.secret.SecretBox.NONCE_SIZE))
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.name, mapping={"state": _DONE, "result": bytes(sealed)})
            pipe.expire(self.name, self.ttl_s)
            await pipe.execute()

    async def abandon(self) -> None:
        """The first request failed without a result to keep: a retry runs afresh."""
        await self.redis.delete(self.name)

    def _open(self, sealed: bytes) -> Replay:
        try:
            kept = json.loads(self._box.decrypt(sealed))
        except (nacl.exceptions.CryptoError, ValueError):
            raise ApiError(
                ErrorCode.INVALID_REQUEST,
                f"this {HEADER} was used with another API key; use a new key",
                param=HEADER,
            ) from None
        return Replay(int(kept["status"]), dict(kept["body"]))
