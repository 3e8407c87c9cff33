"""API keys for the OpenAI-compatible API: random bearer tokens, stored as SHA-256 only."""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets

from sqlalchemy import select, update

from backend.db import Database, rowcount
from backend.models import ApiKey

KEY_PREFIX = "cc-"


def hash_key(key: str) -> str:
    # The keys carry 256 random bits: a fast hash is enough; there is nothing to brute-force.
    return hashlib.sha256(key.encode()).hexdigest()


async def create_key(db: Database, user_id: int, name: str | None = None) -> tuple[str, ApiKey]:
    """A new key for the user: the plaintext (shown once) and its stored row."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(user_id=user_id, key_hash=hash_key(key), prefix=key[:10], name=name)
    async with db.session() as session, session.begin():
        session.add(row)
    return key, row


async def user_for_key(db: Database, key: str) -> int | None:
    """The user a live key belongs to, or None (unknown, malformed or revoked)."""
    if not key.startswith(KEY_PREFIX) or len(key) > 100:
        return None
    async with db.session() as session:
        return await session.scalar(
            select(ApiKey.user_id).where(
                ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None)
            )
        )


async def list_keys(db: Database, user_id: int) -> list[ApiKey]:
    async with db.session() as session:
        rows = await session.scalars(
            select(ApiKey).where(ApiKey.user_id == user_id).order_by(ApiKey.id)
        )
        return list(rows)


async def revoke_key(db: Database, user_id: int, key_id: int) -> bool:
    async with db.session() as session, session.begin():
        result = await session.execute(
            update(ApiKey)
            .where(ApiKey.id == key_id, ApiKey.user_id == user_id, ApiKey.revoked_at.is_(None))
            .values(revoked_at=dt.datetime.now(dt.UTC))
            .execution_options(synchronize_session=False)
        )
        return rowcount(result) == 1
