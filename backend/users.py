"""Users: created on first contact, each with a unique deposit memo and its own accounts."""

from __future__ import annotations

import secrets
from typing import Any

from sqlalchemy import ColumnElement, select, update
from sqlalchemy.exc import IntegrityError

from backend.db import Database, rowcount
from backend.ledger import USER_SIDE_KINDS
from backend.models import Account, User

# Crockford's base32 without I, L, O, U: easy to read back and to type into a wallet.
MEMO_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
MEMO_LENGTH = 10  # 50 bits: collisions are retried, never silently shared
MAX_TELEGRAM_ID = 2**52  # Telegram ids fit 52 bits


def new_deposit_memo() -> str:
    return "CC" + "".join(secrets.choice(MEMO_ALPHABET) for _ in range(MEMO_LENGTH))


def validate_telegram_id(telegram_id: object) -> int:
    if isinstance(telegram_id, bool) or not isinstance(telegram_id, int):
        raise ValueError(f"a Telegram id is a whole number, got {telegram_id!r}")
    if not 0 < telegram_id < MAX_TELEGRAM_ID:
        raise ValueError(f"{telegram_id} is not a Telegram user id")
    return telegram_id


async def update_user(
    db: Database, user_id: int, *only_if: ColumnElement[bool], **values: Any
) -> bool:
    """Set ``values`` on user ``user_id`` where ``only_if`` holds too; False when it did not
    (or there is no such user)."""
    async with db.session() as session, session.begin():
        result = await session.execute(
            update(User)
            .where(User.id == user_id, *only_if)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
    return bool(rowcount(result))


async def get_user(db: Database, telegram_id: int) -> User | None:
    async with db.read_session() as session:
        return await session.scalar(select(User).where(User.telegram_id == telegram_id))


async def get_or_create_user(
    db: Database, telegram_id: int, language_code: str | None = None
) -> User:
    """The user with this Telegram id, created with its accounts on first contact.

    Safe under concurrency: two first messages at once create one user.
    """
    validate_telegram_id(telegram_id)
    for _attempt in range(5):
        user = await get_user(db, telegram_id)
        if user is not None:
            return user
        try:
            async with db.session() as session, session.begin():
                user = User(
                    telegram_id=telegram_id,
                    language_code=(language_code or None) and language_code[:16],
                    deposit_memo=new_deposit_memo(),
                )
                session.add(user)
                await session.flush()
                session.add_all(Account(kind=kind, owner_id=user.id) for kind in USER_SIDE_KINDS)
            return user
        except IntegrityError:
            continue  # a twin created it first (or, once in 2^50, the memo was taken)
    raise RuntimeError(f"could not create user {telegram_id}")


async def find_by_memo(db: Database, memo: str) -> User | None:
    """The user whose deposit memo this is (case and surrounding spaces ignored)."""
    async with db.session() as session:
        return await session.scalar(select(User).where(User.deposit_memo == memo.strip().upper()))
