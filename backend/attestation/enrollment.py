"""Reusable enrollment tokens (``cce_...``): what a provider gives a fleet, or a container that
restarts with new keys, to onboard without a new one-time token each time.

A provider issues one (bot ``/addworker reusable``, ``cocoon provider token --reusable``); it
onboards any number of workers for that provider, each through full attestation (the token
only says which provider is paid), until the provider revokes it (``/workers``, ``cocoon
provider revoke-token``) or it expires (``COCOON_ATTESTATION__ENROLLMENT_TTL_DAYS``). Revoking
it revokes no running worker: each has its own attestation and renewal token.

Stored in the database, durably, as its SHA-256 only (:class:`backend.models.EnrollmentToken`).
A leaked token lets a stranger's attested worker serve, and earn, for the provider: bounded by
``COCOON_ATTESTATION__ENROLLMENT_PER_HOUR`` onboardings per token per hour (counted in Redis,
by clock hour: :func:`reserve`), and nonces by four times as many (:func:`count_nonce`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from dataclasses import dataclass

from redis.asyncio import Redis as AsyncRedis
from sqlalchemy import select, update

from backend.db import Database
from backend.models import EnrollmentToken
from workers.redis_keys import redis_key

PREFIX = "cce_"
MAX_TOKEN_CHARS = 100
RATE = "enroll-rate"  # cocoon:enroll-rate:<kind>:<token hash>:<hour>: onboardings, nonces
NONCES_PER_ONBOARDING = 4


@dataclass(frozen=True)
class Enrollment:
    """An enrollment token as the provider sees it (never the token itself)."""

    id: int
    provider_id: int
    token_hash: str
    created_at: dt.datetime
    expires_at: dt.datetime
    revoked_at: dt.datetime | None
    onboarded: int

    def problem(self, now: dt.datetime) -> str | None:
        """Why this token onboards nothing now (None: it does)."""
        if self.revoked_at is not None:
            return "this enrollment token was revoked by its provider: ask them for a new one"
        if self.expires_at <= now:
            return (
                f"this enrollment token expired at {self.expires_at:%Y-%m-%d %H:%M} UTC: ask "
                "its provider for a new one"
            )
        return None


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def is_enrollment_token(token: object) -> bool:
    return isinstance(token, str) and token.startswith(PREFIX)


def _view(row: EnrollmentToken) -> Enrollment:
    return Enrollment(
        row.id,
        row.provider_id,
        row.token_hash,
        row.created_at,
        row.expires_at,
        row.revoked_at,
        row.onboarded,
    )


async def issue(
    db: Database, provider_id: int, ttl_days: int, now: dt.datetime | None = None
) -> tuple[str, Enrollment]:
    """A new token for ``provider_id``, good for ``ttl_days``; the token is shown once."""
    now = now or dt.datetime.now(dt.UTC)
    token = PREFIX + secrets.token_urlsafe(32)
    row = EnrollmentToken(
        provider_id=provider_id,
        token_hash=token_hash(token),
        created_at=now,
        expires_at=now + dt.timedelta(days=ttl_days),
        onboarded=0,
    )
    async with db.session() as session, session.begin():
        session.add(row)
        await session.flush()
        view = _view(row)
    return token, view


async def lookup(db: Database, token: str) -> Enrollment | None:
    """The token's record (revoked or expired ones too: their refusal says why); None when it
    is unknown or malformed."""
    if not is_enrollment_token(token) or len(token) > MAX_TOKEN_CHARS:
        return None
    async with db.session() as session:
        row = await session.scalar(
            select(EnrollmentToken).where(EnrollmentToken.token_hash == token_hash(token))
        )
    return _view(row) if row is not None else None


async def active(
    db: Database, provider_id: int, now: dt.datetime | None = None
) -> list[Enrollment]:
    """The provider's tokens that still onboard, oldest first."""
    now = now or dt.datetime.now(dt.UTC)
    async with db.session() as session:
        rows = await session.scalars(
            select(EnrollmentToken)
            .where(
                EnrollmentToken.provider_id == provider_id,
                EnrollmentToken.revoked_at.is_(None),
                EnrollmentToken.expires_at > now,
            )
            .order_by(EnrollmentToken.id)
        )
        return [_view(row) for row in rows]


async def revoke(
    db: Database, provider_id: int, enrollment_id: int, now: dt.datetime | None = None
) -> bool:
    """Revoke the provider's token ``enrollment_id``; False when it is not theirs or was already
    revoked. Workers it onboarded keep serving."""
    now = now or dt.datetime.now(dt.UTC)
    async with db.session() as session, session.begin():
        result = await session.execute(
            update(EnrollmentToken)
            .where(
                EnrollmentToken.id == enrollment_id,
                EnrollmentToken.provider_id == provider_id,
                EnrollmentToken.revoked_at.is_(None),
            )
            .values(revoked_at=now)
            .execution_options(synchronize_session=False)
        )
    return bool(getattr(result, "rowcount", 0))


async def note_onboarded(db: Database, enrollment_id: int) -> None:
    async with db.session() as session, session.begin():
        await session.execute(
            update(EnrollmentToken)
            .where(EnrollmentToken.id == enrollment_id)
            .values(onboarded=EnrollmentToken.onboarded + 1)
            .execution_options(synchronize_session=False)
        )


# -- the hourly bound (Redis, by clock hour) ----------------------------------------------------


def _rate_key(kind: str, hashed: str, now: float) -> str:
    return redis_key(RATE, kind, hashed, str(int(now // 3600)))


def wait_s(now: float) -> int:
    """Seconds until the next clock hour, when the bound starts again."""
    return max(1, int(3600 - now % 3600))


async def onboarded_this_hour(redis: AsyncRedis, hashed: str, now: float) -> int:
    return int(await redis.get(_rate_key("onboard", hashed, now)) or 0)


async def reserve(redis: AsyncRedis, hashed: str, per_hour: int, now: float) -> bool:
    """Take one of this hour's ``per_hour`` onboardings; False when none is left (nothing
    taken). Give it back with :func:`release` when the onboarding then fails."""
    key = _rate_key("onboard", hashed, now)
    count = int(await redis.incr(key))
    if count == 1:
        await redis.expire(key, 7200)
    if count <= per_hour:
        return True
    await redis.decr(key)
    return False


async def release(redis: AsyncRedis, hashed: str, now: float) -> None:
    await redis.decr(_rate_key("onboard", hashed, now))


async def count_nonce(redis: AsyncRedis, hashed: str, per_hour: int, now: float) -> bool:
    """Count a nonce issued to this token; False when it has had its hour's share already."""
    key = _rate_key("nonce", hashed, now)
    count = int(await redis.incr(key))
    if count == 1:
        await redis.expire(key, 7200)
    return count <= per_hour * NONCES_PER_ONBOARDING
