"""What a user's profile holds (language, model, referral) and ``/forget``: everything personal
that accounting does not need is deleted."""

from __future__ import annotations

from sqlalchemy import delete, func, select, update

from backend.db import Database
from backend.models import (
    Account,
    AccountKind,
    ApiKey,
    Notification,
    TonWallet,
    TurnReceipt,
    TurnRecord,
    User,
)
from backend.users import update_user

__all__ = ["follow_language", "forget_user", "set_language", "set_model", "set_referrer"]


async def forget_user(db: Database, user_id: int) -> None:
    """Delete what is personal and not needed for accounting: usage records (a provider's
    served turns stay in its statistics, unlinked from the user) and receipts,
    API keys, the top-up wallet link, the referral and language, delivered and pending
    notifications. The ledger (balances and its transactions) stays, as the law on accounting
    requires, and so does a provider's payout wallet while money is still owed to it. The chat
    context lives in Redis and is deleted by the caller (the bot owns it)."""
    async with db.session() as session, session.begin():
        mine = TurnRecord.user_id == user_id
        await session.execute(delete(TurnRecord).where(mine, TurnRecord.provider_id.is_(None)))
        # A turn a provider served stays in its statistics, no longer linked to the user.
        await session.execute(
            update(TurnRecord)
            .where(mine, TurnRecord.provider_id.is_not(None))
            .values(user_id=None)
            .execution_options(synchronize_session=False)
        )
        await session.execute(delete(TurnReceipt).where(TurnReceipt.user_id == user_id))
        await session.execute(delete(ApiKey).where(ApiKey.user_id == user_id))
        await session.execute(
            delete(TonWallet).where(TonWallet.user_id == user_id, TonWallet.purpose == "user")
        )
        await session.execute(delete(Notification).where(Notification.user_id == user_id))
        owed = await session.scalar(
            select(func.coalesce(func.sum(Account.balance), 0)).where(
                Account.owner_id == user_id,
                Account.kind.in_([AccountKind.PROVIDER, AccountKind.PROVIDER_PENDING]),
            )
        )
        if not owed:
            await session.execute(
                delete(TonWallet).where(TonWallet.user_id == user_id, TonWallet.purpose == "payout")
            )
        await session.execute(
            update(User)
            .where(User.id == user_id)
            .values(referrer=None, language_code=None, language_chosen=False)
            .execution_options(synchronize_session=False)
        )


async def set_language(db: Database, user_id: int, language: str) -> None:
    """The language the user chose (/lang): kept until they choose again."""
    await update_user(db, user_id, language_code=language[:16], language_chosen=True)


async def follow_language(db: Database, user_id: int, language: str) -> bool:
    """The Telegram app's language, for a user who never chose one (their notifications then
    speak it too); False when they chose one."""
    return await update_user(
        db, user_id, User.language_chosen.is_(False), language_code=language[:16]
    )


async def set_model(db: Database, user_id: int, model: str) -> None:
    await update_user(db, user_id, model=model[:100])


async def set_referrer(db: Database, user_id: int, referrer: str) -> bool:
    """Keep the first deep-link parameter a user arrived with; later ones are ignored."""
    return await update_user(db, user_id, User.referrer.is_(None), referrer=referrer[:64])
