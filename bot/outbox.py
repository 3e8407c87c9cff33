"""The notification outbox, told to users: deposits, Stars, payouts and worker events.

Rows come from the deposit watcher, the payout sender, attestation, the bounds checks and the
Stars handler (``backend.notifications``). Each is *claimed* (marked delivered) before it is
sent, so two bot replicas never tell one twice; a user who blocked the bot is skipped quietly.
A payout's status message (the one ``/withdraw`` left) is edited in place when its payout
settles.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiohttp
from aiogram import Bot
from aiogram.exceptions import TelegramAPIError, TelegramBadRequest, TelegramForbiddenError
from aiogram.types import InlineKeyboardMarkup
from redis.asyncio import Redis as AsyncRedis

from backend import accounts, notifications
from backend.db import Database
from backend.ledger import Ledger
from backend.models import Notification, TonDeposit, User
from bot.common import again_button, ton
from bot.context import ContextStore
from bot.i18n import _, use_language
from workers.redis_keys import redis_key

log = logging.getLogger("cocoon.bot.outbox")

PAYOUT_MESSAGE = "bot:payout"
PAYOUT_MESSAGE_TTL_S = 30 * 86_400
PAYOUT_OUTCOMES = (notifications.NOTIFY_PAYOUT_CONFIRMED, notifications.NOTIFY_PAYOUT_FAILED)


def payout_message_key(payout_id: int) -> str:
    return redis_key(PAYOUT_MESSAGE, str(payout_id))


def render(notification: Notification, balance: int | None) -> str:
    """The message for one outbox row, in the current language."""
    data = notifications.notification_data(notification)
    kind = notification.kind
    amount = ton(notification.amount)
    if kind == notifications.NOTIFY_DEPOSIT:
        text = _("Your deposit of {amount} has arrived.").format(amount=amount)
    elif kind == notifications.NOTIFY_STARS:
        text = _("Thank you! {stars} Stars credited: {amount}.").format(
            stars=data.get("stars", "?"), amount=amount
        )
    elif kind == notifications.NOTIFY_PAYOUT_CONFIRMED:
        return _("Payout #{id} of {amount} is confirmed on chain.").format(
            id=data.get("payout_id", "?"), amount=amount
        )
    elif kind == notifications.NOTIFY_PAYOUT_FAILED:
        return _("Payout #{id} of {amount} failed; the amount is back in your earnings.").format(
            id=data.get("payout_id", "?"), amount=amount
        )
    elif kind == notifications.NOTIFY_WORKER_ATTESTED:
        tee = _("development TEE") if data.get("tee") == "dev" else str(data.get("tee", "")).upper()
        return _("Worker {worker} is attested ({tee}) and serves {model}.").format(
            worker=data.get("worker_id", "?"), tee=tee, model=data.get("model") or "?"
        )
    elif kind == notifications.NOTIFY_WORKER_FAILED:
        return _("Worker {worker} failed attestation: {reason}").format(
            worker=data.get("worker_id", "?"), reason=data.get("note") or "?"
        )
    elif kind == notifications.NOTIFY_WORKER_OFFLINE:
        return _("Worker {worker} went offline: it gets no jobs until it attests again.").format(
            worker=data.get("worker_id", "?")
        )
    elif kind == notifications.NOTIFY_WORKER_FLAGGED:
        return _(
            "Worker {worker} went beyond what a turn allows ({kind}: {claimed} > {bound}): it "
            "was billed at the bound or cut off. Check that it runs the released node unmodified."
        ).format(
            worker=data.get("worker_id", "?"),
            kind=data.get("kind", "?"),
            claimed=data.get("claimed", "?"),
            bound=data.get("bound", "?"),
        )
    else:
        return _("Your account changed: {amount}.").format(amount=amount)
    if balance is not None:
        text += " " + _("Balance: {balance}.").format(balance=ton(balance))
    return text


class Outbox:
    def __init__(
        self,
        bot: Bot,
        db: Database,
        ledger: Ledger,
        redis: AsyncRedis,
        contexts: ContextStore | None = None,
    ) -> None:
        self.bot = bot
        self.db = db
        self.ledger = ledger
        self.redis = redis
        self.contexts = contexts  # to offer a question refused for balance again
        self._lock = asyncio.Lock()

    async def drain_once(self) -> int:
        """Tell everything pending; returns how many were told."""
        told = 0
        async with self._lock:
            for notification in await notifications.pending_notifications(self.db):
                if await self._deliver(notification):
                    told += 1
        return told

    async def deliver_key(self, key: str) -> bool:
        row = await notifications.find(self.db, key)
        return row is not None and row.delivered_at is None and await self._deliver(row)

    async def _again(self, notification: Notification, user: User) -> InlineKeyboardMarkup | None:
        """Under money that arrived: the question a refusal kept, to ask again."""
        if self.contexts is None or notification.kind not in (
            notifications.NOTIFY_DEPOSIT,
            notifications.NOTIFY_STARS,
        ):
            return None
        if not (await self.contexts.load(user.telegram_id)).pending:
            return None
        return InlineKeyboardMarkup(inline_keyboard=[[again_button()]])

    async def _balance_then(self, notification: Notification, user: User) -> int:
        """The balance right after the money this notice tells of arrived (the current one
        when its ledger transaction cannot be found)."""
        key: str | None = None
        if notification.kind == notifications.NOTIFY_STARS:
            key = notification.key  # credited under the same key (stars:<charge id>)
        elif notification.key.startswith("deposit:") and notification.key[8:].isdecimal():
            async with self.db.session() as session:
                deposit = await session.get(TonDeposit, int(notification.key[8:]))
            key = deposit.ledger_key if deposit is not None else None
        then = await self.ledger.available_after(user.id, key) if key else None
        return then if then is not None else (await self.ledger.balances(user.id)).available

    async def _deliver(self, notification: Notification) -> bool:
        if not await notifications.mark_delivered(self.db, notification.id):
            return False  # another replica told it
        async with self.db.session() as session:
            user = await session.get(User, notification.user_id)
        if user is None:
            return False
        balance = None
        if notification.kind in (notifications.NOTIFY_DEPOSIT, notifications.NOTIFY_STARS):
            balance = await self._balance_then(notification, user)
        with use_language(user.language_code):
            text = render(notification, balance)
        try:
            if not await self._edit_payout_status(notification, text):
                markup = await self._again(notification, user)
                await self.bot.send_message(
                    user.telegram_id, text, parse_mode=None, reply_markup=markup
                )
        except (TelegramForbiddenError, TelegramBadRequest) as error:
            # Blocked, or the chat is gone: telling again would not help.
            log.info("notification %s not told: %s", notification.id, error.message)
            return False
        except (TelegramAPIError, aiohttp.ClientError, TimeoutError) as error:
            # Telegram is down or slow: give it back to the outbox for a later round.
            log.warning("notification %s not told yet: %s", notification.id, type(error).__name__)
            await notifications.mark_undelivered(self.db, notification.id)
            return False
        return True

    async def _edit_payout_status(self, notification: Notification, text: str) -> bool:
        if notification.kind not in PAYOUT_OUTCOMES:
            return False
        payout_id = notifications.notification_data(notification).get("payout_id")
        if payout_id is None:
            return False
        where = await self.redis.get(payout_message_key(int(payout_id)))
        if not where:
            return False
        text_where = where.decode() if isinstance(where, bytes) else where
        chat_id, message_id = (int(x) for x in text_where.split(":"))
        try:
            await self.bot.edit_message_text(
                text=text, chat_id=chat_id, message_id=message_id, parse_mode=None
            )
        except TelegramBadRequest as error:
            log.info("payout status message not edited (%s): sending a new one", error.message)
            return False
        return True

    async def run(self, stop: asyncio.Event, interval_s: float = 2.0) -> None:
        while not stop.is_set():
            try:
                await accounts.watch_workers(self.db, self.redis)
                await self.drain_once()
            except Exception as error:  # the database or Telegram is down: keep trying
                log.warning("outbox: %s", type(error).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)
