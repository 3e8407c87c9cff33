"""A provider's money: /earnings (earned, per hour online and per 1M tokens, fees, the next
payout) and /withdraw (amount, confirmation, the payout's status message) with the payout wallet
linked through TON Connect. :mod:`bot.handlers.provider` puts these handlers on its router."""

from __future__ import annotations

import datetime as dt
import secrets

from aiogram import Bot, F
from aiogram.filters import Command, CommandObject
from aiogram.types import (
    CallbackQuery,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    Message,
)
from redis.asyncio import Redis as AsyncRedis

from backend import accounts
from backend.accounts.economics import Economics, economics
from backend.db import Database
from backend.errors import ErrorCode
from backend.ledger import Ledger
from backend.models import AccountKind, User
from backend.money import AmountError, decimal_comma, parse_amount
from backend.settings import Settings
from backend.ton.comment import friendly_address
from backend.ton.proof import linked_wallet
from bot.common import Handlers, require_provider, state_name, ton
from bot.errors import amount_text, code_text, error_text
from bot.handlers.wallet import offer_wallets, open_wallet
from bot.i18n import _, ngettext
from bot.outbox import PAYOUT_MESSAGE_TTL_S, payout_message_key
from bot.tonconnect import ChatWallets

handlers = Handlers("earnings")


def _duration(seconds: int) -> str:
    hours, minutes = divmod(seconds // 60, 60)
    return _("{hours} h {minutes} min").format(hours=hours, minutes=minutes)


def _percent(bps: int) -> str:
    whole, part = divmod(bps, 100)
    return f"{whole}.{part:02d}".rstrip("0").rstrip(".") if part else str(whole)


def _when(at: dt.datetime) -> str:
    return at.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def economics_lines(x: Economics) -> list[str]:
    """What an hour online and a million tokens earn, the fees, the next payout."""
    lines = []
    if x.per_hour is None:
        lines.append(_("Not online long enough yet to say what an hour earns."))
    else:
        lines.append(
            _("Online: {online}; {per_hour} per hour online").format(
                online=_duration(x.online_s), per_hour=ton(x.per_hour)
            )
        )
    if x.per_million_tokens is not None:
        lines.append(_("Per 1M tokens served: {amount}").format(amount=ton(x.per_million_tokens)))
    lines.append(
        _(
            "Fees: the network keeps {percent}% of each reply's price ({fees} of the "
            "replies you served)"
        ).format(percent=_percent(x.fee_bps), fees=ton(x.fees))
    )
    payout = x.next_payout
    if payout.kind == "on_its_way" and payout.at is not None:
        lines.append(_("Next payout: on its way, expected by {at}").format(at=_when(payout.at)))
    elif payout.kind == "ready":
        lines.append(_("Next payout: ready now, with /withdraw"))
    elif payout.kind == "after_online" and payout.at is not None and payout.online_s:
        lines.append(
            _(
                "Next payout: after about {online} more online at your rate so far (around "
                "{at}), when you reach {minimum}"
            ).format(
                online=_duration(payout.online_s),
                at=_when(payout.at),
                minimum=ton(x.min_withdrawal),
            )
        )
    else:
        lines.append(
            _("Next payout: once you have earned {minimum}").format(minimum=ton(x.min_withdrawal))
        )
    return lines


@handlers.message(Command("earnings"))
async def cmd_earnings(
    message: Message, user: User, ledger: Ledger, redis: AsyncRedis, settings: Settings
) -> None:
    if not await require_provider(message, user):
        return
    e = await accounts.earnings(ledger, user.id)
    x = await economics(ledger, redis, settings, user.id)
    await message.answer(
        "\n".join(
            [
                _("Earned: {earned} from {jobs}").format(
                    earned=ton(e.earned),
                    jobs=ngettext("{n} job", "{n} jobs", e.jobs).format(n=e.jobs),
                ),
                *economics_lines(x),
                _("Available to withdraw: {available}").format(available=ton(e.available)),
                _("In payouts on their way: {pending}").format(pending=ton(e.pending)),
                _("Paid out: {paid}").format(paid=ton(e.paid)),
                _("Withdraw with /withdraw AMOUNT or /withdraw all."),
            ]
        ),
        parse_mode=None,
    )


@handlers.message(Command("withdraw"))
async def cmd_withdraw(
    message: Message,
    command: CommandObject,
    user: User,
    db: Database,
    ledger: Ledger,
    settings: Settings,
    lang: str,
) -> None:
    if not await require_provider(message, user):
        return
    raw = (command.args or "").strip().lower()
    if not raw:
        await message.answer(_("Say how much: /withdraw 1.5 or /withdraw all."))
        return
    available = await ledger.balance(AccountKind.PROVIDER, user.id)
    if raw == "all":
        amount = available
    else:
        try:
            # The one grammar, in the user's language: "1,000" is one only where a comma
            # is how decimals are written; elsewhere it is refused, never guessed.
            amount = parse_amount(raw, comma=decimal_comma(lang))
        except AmountError as error:
            await message.answer(amount_text(error, raw), parse_mode=None)
            return
    wallet = await linked_wallet(db, user.id, "payout")
    if wallet is None:
        await message.answer(code_text(ErrorCode.NO_PAYOUT_WALLET))
        return
    problem = accounts.withdrawal_refusal(settings, amount, available)
    if problem is not None:
        await message.answer(error_text(problem))
        return
    address = friendly_address(wallet.address, bounceable=False, testnet=settings.ton.is_testnet)
    nonce = secrets.token_hex(6)
    keyboard = InlineKeyboardMarkup(
        inline_keyboard=[
            [
                InlineKeyboardButton(text=_("Confirm"), callback_data=f"wd:{amount}:{nonce}"),
                InlineKeyboardButton(text=_("Cancel"), callback_data="wd:no"),
            ]
        ]
    )
    await message.answer(
        _("Withdraw {amount} to {address}?").format(amount=ton(amount), address=address),
        reply_markup=keyboard,
    )


@handlers.callback_query(F.data == "wd:no")
async def on_withdraw_cancel(query: CallbackQuery) -> None:
    await query.answer()
    if isinstance(query.message, Message):
        await query.message.edit_text(_("Withdrawal cancelled."))


@handlers.callback_query(F.data.startswith("wd:"))
async def on_withdraw_confirm(
    query: CallbackQuery, user: User, ledger: Ledger, settings: Settings, redis: AsyncRedis
) -> None:
    try:
        _prefix, amount_text, nonce = (query.data or "").split(":")
        amount = int(amount_text)
    except ValueError:
        await query.answer(_("This button is not valid any more."), show_alert=True)
        return
    try:
        payout = await accounts.withdraw(
            ledger, settings, user.id, amount, f"bot:withdraw:{user.id}:{nonce}"
        )
    except accounts.AccountError as error:
        await query.answer()
        if isinstance(query.message, Message):
            await query.message.edit_text(error_text(error))
        return
    await query.answer()
    if not isinstance(query.message, Message):
        return
    status = _(
        "Payout #{id} of {amount} requested; status: {state}. This message changes when it is "
        "confirmed on chain."
    ).format(id=payout.id, amount=ton(payout.amount), state=state_name(payout.state))
    message = await query.message.edit_text(status)
    message_id = message.message_id if isinstance(message, Message) else query.message.message_id
    await redis.set(
        payout_message_key(payout.id),
        f"{query.message.chat.id}:{message_id}",
        ex=PAYOUT_MESSAGE_TTL_S,
    )


@handlers.callback_query(F.data == "tcw:p")
async def on_payout_wallets(query: CallbackQuery, wallets: ChatWallets) -> None:
    await offer_wallets(query, wallets, "tcw:p", topup=False)


@handlers.callback_query(F.data.startswith("tcw:p:"))
async def on_payout_wallet(
    query: CallbackQuery, bot: Bot, user: User, wallets: ChatWallets, lang: str
) -> None:
    key = (query.data or "").split(":", 2)[2]
    await query.answer()  # the bridge may take a while: no spinner meanwhile
    chat_id = query.message.chat.id if query.message else query.from_user.id
    await open_wallet(
        bot,
        chat_id,
        wallets.link_payout(bot, chat_id, user.id, key, lang),
        _(
            "Open your wallet and approve the connection: it signs a proof that the wallet "
            "is yours."
        ),
    )
