"""Top-ups: the Mini App, a TON transfer with the user's memo, TON Connect from the chat, and
Telegram Stars (invoice in XTR, pre-checkout answered at once, each payment credited once)."""

from __future__ import annotations

import html
import logging
from collections.abc import Awaitable
from urllib.parse import urlencode

from aiogram import Bot, F
from aiogram.enums import ChatType, ParseMode
from aiogram.filters import Command, CommandObject
from aiogram.types import (
    CallbackQuery,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    LabeledPrice,
    Message,
    PreCheckoutQuery,
    WebAppInfo,
)

from backend import accounts
from backend.accounts import stars_pending
from backend.ledger import Ledger
from backend.models import User
from backend.money import AmountError, decimal_comma, parse_amount
from backend.settings import Settings
from backend.ton.comment import AddressError, friendly_address
from backend.ton.jettons import USDT_DECIMALS
from bot.common import Handlers, ton
from bot.errors import amount_text
from bot.i18n import _
from bot.outbox import Outbox
from bot.tonconnect import ChatWallets, WalletError
from bot.tonconnect_client import wallet_id

log = logging.getLogger("cocoon.bot.wallet")

handlers = Handlers("wallet")

STAR_AMOUNTS = (50, 100, 250, 1000)
MAX_TOPUP = 10**6 * 1_000_000_000
MAX_STARS = accounts.MAX_STARS
CURRENCY = "XTR"


def miniapp_url(settings: Settings, page: str = "") -> str | None:
    """The Mini App's https URL (Telegram opens Mini Apps over https only)."""
    if not settings.public_url or not settings.public_url.startswith("https://"):
        return None
    return settings.public_url.rstrip("/") + "/app" + page


def deposit_address(settings: Settings) -> str | None:
    if not settings.ton.deposit_address:
        return None
    try:
        return friendly_address(
            settings.ton.deposit_address, bounceable=False, testnet=settings.ton.is_testnet
        )
    except AddressError:
        return None


def topup_keyboard(
    settings: Settings, private: bool, ton_connect: bool = False, amount: int | None = None
) -> InlineKeyboardMarkup:
    rows = []
    url = miniapp_url(settings)
    if url and private:
        rows.append([InlineKeyboardButton(text=_("Open the wallet"), web_app=WebAppInfo(url=url))])
    if deposit_address(settings) and private and ton_connect:
        data = "topup:ton" if amount is None else f"tonamt:{amount}"
        rows.append([InlineKeyboardButton(text=_("Pay from a TON wallet"), callback_data=data)])
    rows.append(
        [InlineKeyboardButton(text=_("Pay with Telegram Stars"), callback_data="topup:stars")]
    )
    return InlineKeyboardMarkup(inline_keyboard=rows)


def transfer_link(address: str, memo: str, amount: int | None) -> str:
    """The ``ton://transfer`` link any TON wallet opens with the address, amount and comment."""
    query = {"text": memo} if amount is None else {"amount": str(amount), "text": memo}
    return f"ton://transfer/{address}?{urlencode(query)}"


def topup_text(settings: Settings, user: User, amount: int | None) -> str:
    """/topup's words (HTML): the address and memo to copy, the transfer link, Stars."""
    lines = [html.escape(_("Add funds to your balance:"))]
    address = deposit_address(settings)
    if address:
        code = "<code>{}</code>"
        lines.append(
            html.escape(
                _(
                    "Send GRAM to {address} with this comment (memo): {memo}. It is credited "
                    "once the transfer is on chain."
                )
            ).format(
                address=code.format(html.escape(address)),
                memo=code.format(html.escape(user.deposit_memo)),
            )
        )
        if amount is not None:
            lines.append(html.escape(_("Amount: {amount}").format(amount=ton(amount))))
        lines.append(
            html.escape(_("Or open this link in a TON wallet app: {link}")).format(
                link=code.format(html.escape(transfer_link(address, user.deposit_memo, amount)))
            )
        )
    if address and settings.ton.takes_usdt:
        rate = settings.ton.usdt_nano_per_micro * 10**USDT_DECIMALS
        lines.append(
            html.escape(
                _(
                    "Or send USDT (on TON) to the same address with the same comment: "
                    "1 USDT = {rate}, credited at the rate in force when it arrives."
                ).format(rate=ton(rate))
            )
        )
    lines.append(
        html.escape(
            _("Or pay with Telegram Stars: 1 Star = {rate}.").format(
                rate=ton(settings.stars_nano_per_star)
            )
        )
    )
    return "\n\n".join(lines)


@handlers.message(Command("topup"))
async def cmd_topup(
    message: Message,
    command: CommandObject,
    user: User,
    settings: Settings,
    wallets: ChatWallets,
    lang: str,
) -> None:
    """``/topup [AMOUNT]``: how to add funds (with AMOUNT, the link and TON Connect ask it)."""
    amount = None
    if command.args:
        try:
            amount = parse_amount(command.args, comma=decimal_comma(lang))
        except AmountError as error:
            await message.answer(amount_text(error, command.args), parse_mode=None)
            return
        if amount > MAX_TOPUP:
            await message.answer(_("This amount is not available."))
            return
    await message.answer(
        topup_text(settings, user, amount),
        parse_mode=ParseMode.HTML,
        reply_markup=topup_keyboard(
            settings,
            message.chat.type == ChatType.PRIVATE,
            ton_connect=wallets.available(topup=True),
            amount=amount,
        ),
    )


@handlers.callback_query(F.data == "topup:open")
async def on_topup_open(
    query: CallbackQuery, user: User, settings: Settings, wallets: ChatWallets
) -> None:
    """/topup from a button (under a refusal for balance, under /start)."""
    await query.answer()
    if query.message is not None:
        await query.message.answer(
            topup_text(settings, user, None),
            parse_mode=ParseMode.HTML,
            reply_markup=topup_keyboard(settings, True, ton_connect=wallets.available(topup=True)),
        )


@handlers.callback_query(F.data == "topup:stars")
async def on_topup_stars(query: CallbackQuery, settings: Settings) -> None:
    rows = [
        [
            InlineKeyboardButton(
                text=_("{stars} Stars → {amount}").format(
                    stars=stars, amount=ton(stars * settings.stars_nano_per_star)
                ),
                callback_data=f"stars:{stars}",
            )
        ]
        for stars in STAR_AMOUNTS
    ]
    await query.answer()
    if query.message is not None:
        await query.message.answer(
            _("How many Stars?"), reply_markup=InlineKeyboardMarkup(inline_keyboard=rows)
        )


@handlers.callback_query(F.data.startswith("stars:"))
async def on_stars_amount(query: CallbackQuery, bot: Bot, user: User, settings: Settings) -> None:
    try:
        stars = int((query.data or "").split(":", 1)[1])
    except ValueError:
        stars = 0
    if not 0 < stars <= MAX_STARS:
        await query.answer(_("This amount is not available."), show_alert=True)
        return
    await query.answer()
    chat_id = query.message.chat.id if query.message else query.from_user.id
    invoice = accounts.stars_invoice(user.id, stars, settings)
    await bot.send_invoice(
        chat_id=chat_id,
        title=_("Cocoon balance"),
        description=_("{amount} for AI chat on Cocoon").format(
            amount=ton(stars * settings.stars_nano_per_star)
        ),
        payload=invoice.payload,
        currency=CURRENCY,
        prices=[LabeledPrice(label=_("Balance top-up"), amount=stars)],
    )


@handlers.pre_checkout_query()
async def on_pre_checkout(query: PreCheckoutQuery, user: User, settings: Settings) -> None:
    """Answered at once (Telegram waits 10 s at most): only our own, well-formed invoices, at
    the rate the bot issues now (an invoice of another rate: ask for a new one)."""
    invoice = accounts.parse_stars_payload(query.invoice_payload)
    if (
        invoice is None
        or query.currency != CURRENCY
        or invoice.user_id != user.id
        or invoice.stars != query.total_amount
        or invoice.nano_per_star not in (None, settings.stars_nano_per_star)
    ):
        await query.answer(ok=False, error_message=_("This invoice is not valid any more."))
        return
    await query.answer(ok=True)


@handlers.message(F.successful_payment)
async def on_successful_payment(
    message: Message, user: User, ledger: Ledger, settings: Settings, outbox: Outbox
) -> None:
    payment = message.successful_payment
    assert payment is not None
    if payment.currency != CURRENCY:
        log.error("a successful payment in %s was not expected", payment.currency)
        return
    # Failing here (the database is down): bot.telegram.on_error keeps it for a retry.
    receipt = await stars_pending.credit_paid(
        ledger,
        settings,
        user.id,
        payment.total_amount,
        payment.telegram_payment_charge_id,
        payment.invoice_payload,
    )
    if receipt.replayed:
        log.info("a Stars payment arrived again: already credited, nothing changed")
        return
    # Tell the user now, through the outbox (so it is told exactly once).
    await outbox.deliver_key(f"stars:{payment.telegram_payment_charge_id}")


# ------------------------------------------------------------- TON Connect from the chat

TON_AMOUNTS = (1, 5, 10)


async def wallet_keyboard(wallets: ChatWallets, prefix: str) -> InlineKeyboardMarkup | None:
    """One button per wallet offered (callback ``<prefix>:<wallet id>``); None when none is."""
    found = await wallets.wallets()
    if not found:
        return None
    rows = [
        [InlineKeyboardButton(text=str(w["name"]), callback_data=f"{prefix}:{wallet_id(w)}")]
        for w in found
    ]
    return InlineKeyboardMarkup(inline_keyboard=rows)


def link_keyboard(url: str, name: str) -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup(
        inline_keyboard=[
            [InlineKeyboardButton(text=_("Open {wallet}").format(wallet=name), url=url)],
            [InlineKeyboardButton(text=_("Cancel"), callback_data="tcx")],
        ]
    )


async def offer_wallets(
    query: CallbackQuery, wallets: ChatWallets, prefix: str, *, topup: bool
) -> None:
    """Answer ``query`` with the wallets to choose from (buttons ``<prefix>:<wallet id>``), or
    say TON Connect is not available here (for a top-up when ``topup``, else for a link)."""
    if not wallets.available(topup=topup):
        await query.answer(_("TON Connect is not available here: use /topup."), show_alert=True)
        return
    await query.answer()
    keyboard = await wallet_keyboard(wallets, prefix)
    if query.message is not None:
        if keyboard is None:
            await query.message.answer(_("TON Connect is not available here: use /topup."))
            return
        await query.message.answer(_("Which wallet do you use?"), reply_markup=keyboard)


async def open_wallet(
    bot: Bot, chat_id: int, connecting: Awaitable[tuple[str, str]], text: str
) -> None:
    """Send ``text`` with the button that opens the wallet ``connecting`` names and links
    (``(name, url)``), or what went wrong when the wallet cannot be reached."""
    try:
        name, url = await connecting
    except WalletError as error:
        await bot.send_message(chat_id, wallet_error_text(error))
        return
    await bot.send_message(chat_id, text, reply_markup=link_keyboard(url, name))


def wallet_error_text(error: WalletError) -> str:
    if error.code == "unreachable":
        return _(
            "This wallet cannot be reached right now: nothing was done. Try another wallet, "
            "or pay with the address and memo of /topup."
        )
    return _("TON Connect is not available here: use /topup.")


def ton_connect_amounts(amounts: list[int]) -> list[InlineKeyboardButton]:
    return [
        InlineKeyboardButton(text=ton(amount), callback_data=f"tonamt:{amount}")
        for amount in amounts
    ]


@handlers.callback_query(F.data == "topup:ton")
async def on_topup_ton(query: CallbackQuery, wallets: ChatWallets) -> None:
    if not wallets.available(topup=True):
        await query.answer(_("TON Connect is not available here: use /topup."), show_alert=True)
        return
    await query.answer()
    if query.message is None:
        return
    row = ton_connect_amounts([n * 1_000_000_000 for n in TON_AMOUNTS])
    await query.message.answer(
        _("How much? (Any other amount: send it to the address above with your memo.)"),
        reply_markup=InlineKeyboardMarkup(inline_keyboard=[row]),
    )


def _amount(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        return 0
    return value if 0 < value <= MAX_TOPUP else 0


@handlers.callback_query(F.data.startswith("tonamt:"))
async def on_ton_amount(query: CallbackQuery, wallets: ChatWallets) -> None:
    amount = _amount((query.data or "").split(":", 1)[1])
    if not amount:
        await query.answer(_("This amount is not available."), show_alert=True)
        return
    await offer_wallets(query, wallets, f"tcw:t:{amount}", topup=True)


@handlers.callback_query(F.data.startswith("tcw:t:"))
async def on_topup_wallet(
    query: CallbackQuery, bot: Bot, user: User, wallets: ChatWallets, lang: str
) -> None:
    _prefix, _kind, amount_text, key = ((query.data or "") + ":::").split(":")[:4]
    amount = _amount(amount_text)
    if not amount:
        await query.answer(_("This amount is not available."), show_alert=True)
        return
    await query.answer()  # the bridge may take a while: no spinner meanwhile
    chat_id = query.message.chat.id if query.message else query.from_user.id
    await open_wallet(
        bot,
        chat_id,
        wallets.topup(bot, chat_id, user.id, user.deposit_memo, amount, key, lang),
        _(
            "Open your wallet and approve the connection; then confirm the transfer of {amount}."
        ).format(amount=ton(amount)),
    )


@handlers.callback_query(F.data == "tcx")
async def on_ton_connect_cancel(query: CallbackQuery, user: User, wallets: ChatWallets) -> None:
    if wallets.cancel(user.id):
        await query.answer(_("Cancelled: the wallet connection is closed."))
    else:
        await query.answer(_("Nothing is waiting for your wallet."))
