"""What the Mini App does, apart from HTTP: one plain class over the backend's services.

Routes (``miniapp.routes``) parse and render; money, wallets and turns go through the shared
backend layers (``backend.accounts``, ``backend.ton``, the ledger and the dispatcher), so the
Mini App follows the same rules as the bot.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

import redis
from sqlalchemy import delete

from backend import accounts
from backend.accounts.economics import economics
from backend.db import Database
from backend.dispatch import Dispatcher, Turn, TurnDone, TurnRequest
from backend.errors import CocoonError, ErrorCode
from backend.i18n import pick_language
from backend.ledger import Ledger
from backend.models import TonWallet, User
from backend.money import AmountError, decimal_comma, parse_amount
from backend.ratelimit import RateLimiter
from backend.settings import Settings
from backend.ton import proof as ton_proof
from backend.ton.comment import deposit_transaction, friendly_address
from backend.ton.jettons import (
    MAX_USDT_UNITS,
    USDT_DECIMALS,
    format_usdt,
    jetton_topup_transaction,
    usdt_credit,
)
from backend.ton.toncenter import TonCenter, TonCenterError
from backend.users import get_or_create_user
from miniapp import protocol as p
from miniapp.auth import TelegramCaller
from miniapp.texts import N_, translate
from workers.wire import ChatMessage

if TYPE_CHECKING:
    from aiogram import Bot

TOPUP_PRESETS = ["1", "5", "10", "50"]
STARS_PRESETS = [50, 100, 250, 1000]
USDT_PRESETS = ["5", "10", "25", "100"]


class MiniAppError(CocoonError):
    """A refusal of the Mini App's own. Its HTTP status and words follow from the code
    (``miniapp.routes.STATUS``, ``miniapp.texts.ERRORS``); the message fills ``{detail}`` and
    the details the other placeholders."""


PROOF_REFUSALS = {
    ton_proof.NO_STATE_INIT: N_(
        "your wallet sent no state init and is not deployed yet, so its key cannot be "
        "checked. Make one transfer from this wallet (that deploys it) or update the wallet "
        "app, then link it again."
    ),
    ton_proof.NO_KEY: N_("your wallet's public key cannot be read from the chain."),
    ton_proof.CHAIN_UNAVAILABLE: N_(
        "your wallet's key could not be read from the TON network now. Try again in a minute."
    ),
}


def proof_refusal(language: str, error: ton_proof.ProofError) -> str:
    """Why a wallet's proof was refused: in the caller's language where the refusal has words
    of its own (a missing state init or key), else the verifier's reason."""
    words = PROOF_REFUSALS.get(error.code)
    return translate(language, words) if words else str(error)


@dataclass(frozen=True)
class Caller:
    user: User
    telegram: TelegramCaller
    language: str


def _amount(caller: Caller, text: str) -> int:
    """A typed amount in the grammar the page checks too (a comma where the language has one)."""
    try:
        return parse_amount(text, comma=decimal_comma(pick_language(caller.language)))
    except AmountError as error:
        raise MiniAppError(
            ErrorCode.INVALID_AMOUNT, str(error), problem=error.problem.value
        ) from None


def _nano(value: int) -> str:
    return str(int(value))


def _iso(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


class MiniApp:
    """Process-wide; made in ``miniapp.setup``'s cleanup context."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        ledger: Ledger,
        dispatcher: Dispatcher,
        bot: Bot | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.ledger = ledger
        self.dispatcher = dispatcher
        self.bot = bot  # for Stars invoices; None without a bot token
        # Turns streaming from this process, by the token their page was given: (user, turn).
        self.running: dict[str, tuple[int, Turn]] = {}

    # ------------------------------------------------------------------ users

    async def caller(self, telegram: TelegramCaller, page_language: str = "") -> Caller:
        """The user behind a verified ``initData``; answers go in the page's language where
        it names one, else in the one saved at first contact."""
        user = await get_or_create_user(self.db, telegram.telegram_id, telegram.language_code)
        language = page_language or user.language_code or telegram.language_code or "en"
        return Caller(user, telegram, language)

    def _wallet_view(self, wallet: TonWallet | None) -> p.LinkedWallet | None:
        if wallet is None:
            return None
        return p.LinkedWallet(
            address=friendly_address(
                wallet.address, bounceable=False, testnet=self.settings.ton.is_testnet
            ),
            raw=wallet.address,
        )

    async def me(self, caller: Caller) -> p.Me:
        user = caller.user
        balances = await self.ledger.balances(user.id)
        wallet = await ton_proof.linked_wallet(self.db, user.id, "user")
        payout = await ton_proof.linked_wallet(self.db, user.id, "payout")
        models = [
            p.ModelView(
                id=name,
                prompt=_nano(price.prompt),
                completion=_nano(price.completion),
                context_length=price.context_length,
            )
            for name, price in sorted(self.settings.models.items())
        ]
        model = user.model if user.model in self.settings.models else None
        if model is None:
            model = self.settings.default_model()
        return p.Me(
            telegram_id=user.telegram_id,
            first_name=caller.telegram.first_name,
            language=pick_language(caller.language),
            dev=caller.telegram.dev,
            balance=p.Balance(available=_nano(balances.available), held=_nano(balances.held)),
            deposit_memo=user.deposit_memo,
            wallet=self._wallet_view(wallet),
            payout_wallet=self._wallet_view(payout),
            is_provider=bool(user.is_provider),
            model=model,
            models=models,
            topup=p.TopUpOptions(
                ton=self.settings.ton.deposit_address is not None,
                deposit_address=self._deposit_address(),
                presets=TOPUP_PRESETS,
                stars=self.bot is not None,
                stars_presets=STARS_PRESETS,
                nano_per_star=_nano(self.settings.stars_nano_per_star),
                usdt=self.settings.ton.takes_usdt,
                nano_per_usdt=_nano(self.settings.ton.usdt_nano_per_micro * 10**USDT_DECIMALS)
                if self.settings.ton.takes_usdt
                else None,
                usdt_presets=USDT_PRESETS if self.settings.ton.takes_usdt else [],
            ),
            network=self.settings.ton.network,
        )

    async def choose_model(self, caller: Caller, model: str) -> None:
        if model not in self.settings.models:
            raise MiniAppError(ErrorCode.UNKNOWN_MODEL)
        await accounts.set_model(self.db, caller.user.id, model)

    # ----------------------------------------------------------------- wallets

    def proof_domains(self, request_host: str | None) -> list[str]:
        """Domains a ton_proof may name: the setting, else the public URL's host; in
        development mode only, the host the page was loaded from."""
        if self.settings.ton.proof_domains:
            return list(self.settings.ton.proof_domains)
        if self.settings.public_url:
            host = urlsplit(self.settings.public_url).netloc
            if host:
                return [host]
        if self.settings.miniapp_dev and request_host:
            return [request_host]
        return []

    async def proof_payload(self) -> p.ProofPayload:
        ttl = self.settings.ton.proof_ttl_s
        return p.ProofPayload(payload=await ton_proof.issue_payload(self.db, ttl), ttl_s=ttl)

    async def link_wallet(
        self, caller: Caller, body: p.LinkWalletRequest, request_host: str | None
    ) -> p.LinkedWallet:
        domains = self.proof_domains(request_host)
        if not domains:
            raise MiniAppError(ErrorCode.PROOF_UNAVAILABLE)
        if body.purpose == "payout" and not caller.user.is_provider:
            raise MiniAppError(ErrorCode.NOT_PROVIDER)
        account_dict = {
            "address": body.account.address,
            "network": body.account.chain,
            "walletStateInit": body.account.walletStateInit,
            "publicKey": body.account.publicKey,
        }
        try:
            wallet = await ton_proof.link_wallet(
                self.db,
                caller.user.id,
                body.purpose,
                account_dict,
                body.proof.model_dump(),
                allowed_domains=domains,
                max_age_s=self.settings.ton.proof_ttl_s,
                network=ton_proof.NETWORKS[self.settings.ton.network],
                chain=ton_proof.toncenter_keys(self.settings.ton),
            )
        except ton_proof.ProofError as error:
            detail = proof_refusal(caller.language, error)
            raise MiniAppError(ErrorCode.PROOF_REFUSED, detail) from None
        view = self._wallet_view(wallet)
        assert view is not None
        return view

    async def unlink_wallet(self, caller: Caller) -> None:
        async with self.db.session() as session, session.begin():
            await session.execute(
                delete(TonWallet).where(
                    TonWallet.user_id == caller.user.id, TonWallet.purpose == "user"
                )
            )

    # ----------------------------------------------------------------- top-ups

    def top_up(self, caller: Caller, amount_text: str) -> p.TopUp:
        ton = self.settings.ton
        if ton.deposit_address is None:
            raise MiniAppError(ErrorCode.TOPUP_UNAVAILABLE)
        amount = _amount(caller, amount_text)
        request = deposit_transaction(
            ton.deposit_address,
            caller.user.deposit_memo,
            amount,
            ttl_s=ton.deposit_ttl_s,
            testnet=ton.is_testnet,
        )
        return p.TopUp(
            amount=_nano(amount),
            memo=caller.user.deposit_memo,
            deposit_address=friendly_address(
                ton.deposit_address, bounceable=False, testnet=ton.is_testnet
            ),
            transaction=p.TonConnectTransaction.model_validate(request),
        )

    async def top_up_usdt(self, caller: Caller, amount_text: str) -> p.UsdtTopUp:
        """The jetton transfer the linked wallet signs: ``amount_text`` USDT from its own USDT
        jetton wallet to the deposit wallet, the memo as the forward comment. Credited at
        the rate in force when the watcher reads it (shown here)."""
        ton = self.settings.ton
        if not ton.takes_usdt or ton.usdt_master is None or ton.deposit_address is None:
            raise MiniAppError(ErrorCode.TOPUP_UNAVAILABLE)
        nano = _amount(caller, amount_text)  # 9 decimals; USDT has 6
        units, rest = divmod(nano, 10 ** (9 - USDT_DECIMALS))
        credited = usdt_credit(units, ton.usdt_nano_per_micro)
        if rest or units > MAX_USDT_UNITS or credited is None:
            raise MiniAppError(ErrorCode.INVALID_AMOUNT)
        wallet = await ton_proof.linked_wallet(self.db, caller.user.id, "user")
        if wallet is None:
            raise MiniAppError(ErrorCode.INVALID_REQUEST, "connect a wallet first")
        try:
            async with TonCenter.from_settings(ton) as api:
                jetton_wallet = await api.jetton_wallet_address(ton.usdt_master, wallet.address)
        except TonCenterError:
            raise MiniAppError(ErrorCode.TOPUP_UNAVAILABLE) from None
        if jetton_wallet is None:
            raise MiniAppError(ErrorCode.TOPUP_UNAVAILABLE)
        request = jetton_topup_transaction(
            jetton_wallet,
            wallet.address,
            ton.deposit_address,
            caller.user.deposit_memo,
            units,
            ttl_s=ton.deposit_ttl_s,
            testnet=ton.is_testnet,
        )
        return p.UsdtTopUp(
            usdt=format_usdt(units),
            units=str(units),
            amount=_nano(credited),
            nano_per_usdt=_nano(ton.usdt_nano_per_micro * 10**USDT_DECIMALS),
            memo=caller.user.deposit_memo,
            transaction=p.TonConnectTransaction.model_validate(request),
        )

    async def stars_invoice(self, caller: Caller, stars: int, title: str, label: str) -> str:
        if self.bot is None:
            raise MiniAppError(ErrorCode.STARS_UNAVAILABLE)
        from aiogram.exceptions import TelegramAPIError
        from aiogram.types import LabeledPrice

        try:
            return await self.bot.create_invoice_link(
                title=title,
                description=label,
                # The bot's pre_checkout_query and successful_payment handlers read this:
                # stars:<user id>:<stars>:<rate> (the bot credits it, once per charge id).
                payload=accounts.stars_invoice(caller.user.id, stars, self.settings).payload,
                currency="XTR",
                prices=[LabeledPrice(label=label, amount=stars)],
            )
        except (TelegramAPIError, OSError, TimeoutError):
            raise MiniAppError(ErrorCode.STARS_FAILED) from None

    # ----------------------------------------------------------------- history

    async def history(
        self, caller: Caller, kind: str | None, page: int, cursor: str | None = None
    ) -> p.History:
        result = await accounts.history(  # AccountError invalid_page: bad kind, page or cursor
            self.db,
            caller.user.id,
            kind=kind,
            page=page,
            per_page=20,
            cursor=cursor,
        )
        return p.History(
            items=[
                p.HistoryEntry(
                    kind=item.kind,
                    at=_iso(item.at) or "",
                    amount=_nano(item.amount),
                    details=self._details(item.details),
                )
                for item in result.items
            ],
            page=result.page,
            per_page=result.per_page,
            has_more=result.has_more,
            next_cursor=result.next_cursor,
        )

    def _details(self, details: dict[str, object]) -> dict[str, object]:
        """A history row's details as the page shows them: addresses user-friendly, a chain
        transaction with its explorer link."""
        shown = {
            key: (self._address(value) if key == "destination" else value)
            for key, value in details.items()
        }
        tx_hash = details.get("tx_hash")
        if isinstance(tx_hash, str):
            try:
                raw = base64.b64decode(tx_hash, validate=True)
            except binascii.Error:
                raw = b""
            if len(raw) == 32:
                host = "testnet.tonviewer.com" if self.settings.ton.is_testnet else "tonviewer.com"
                shown["tx_url"] = f"https://{host}/transaction/{raw.hex()}"
        return shown

    def _deposit_address(self) -> str | None:
        ton = self.settings.ton
        if ton.deposit_address is None:
            return None
        return friendly_address(ton.deposit_address, bounceable=False, testnet=ton.is_testnet)

    def _address(self, value: object) -> object:
        if not isinstance(value, str) or not value:
            return value
        try:
            return friendly_address(value, bounceable=False, testnet=self.settings.ton.is_testnet)
        except ValueError:
            return value

    # ---------------------------------------------------------------- provider

    def _require_provider(self, caller: Caller) -> None:
        if not caller.user.is_provider:
            raise MiniAppError(ErrorCode.NOT_PROVIDER)

    async def provider(self, caller: Caller) -> p.ProviderDashboard:
        self._require_provider(caller)
        workers = await accounts.provider_workers(self.db, self.dispatcher.redis, caller.user.id)
        earned = await accounts.earnings(self.ledger, caller.user.id)
        x = await economics(self.ledger, self.dispatcher.redis, self.settings, caller.user.id)
        payout = await ton_proof.linked_wallet(self.db, caller.user.id, "payout")
        return p.ProviderDashboard(
            workers=[
                p.WorkerEntry(
                    worker_id=w.worker_id,
                    model=w.model,
                    tee=w.tee,
                    image=w.image,
                    state=str(w.state),
                    online=w.online,
                    attestation_expires_at=_iso(w.expires_at),
                    jobs=w.jobs,
                    earned=_nano(w.earned),
                )
                for w in workers
            ],
            earnings=p.EarningsView(
                available=_nano(earned.available),
                pending=_nano(earned.pending),
                paid=_nano(earned.paid),
                earned=_nano(earned.earned),
                jobs=earned.jobs,
            ),
            payout_wallet=self._wallet_view(payout),
            min_withdrawal=_nano(self.settings.min_withdrawal_nano),
            economics=p.EconomicsView(
                online_s=x.online_s,
                tokens=x.tokens,
                per_hour=None if x.per_hour is None else _nano(x.per_hour),
                per_million_tokens=None
                if x.per_million_tokens is None
                else _nano(x.per_million_tokens),
                fees=_nano(x.fees),
                fee_bps=x.fee_bps,
                next_payout=p.NextPayoutView(
                    kind=x.next_payout.kind,
                    at=_iso(x.next_payout.at),
                    online_s=x.next_payout.online_s,
                ),
            ),
        )

    async def withdraw(self, caller: Caller, body: p.WithdrawRequest) -> p.PayoutView:
        self._require_provider(caller)
        amount: int | Literal["all"]
        if body.amount.strip().lower() == "all":
            amount = "all"
        else:
            amount = _amount(caller, body.amount)
        payout = await accounts.withdraw(  # AccountError: the routes answer it
            self.ledger,
            self.settings,
            caller.user.id,
            amount,
            f"miniapp:{caller.user.id}:{body.key}",
        )
        return p.PayoutView(
            id=payout.id,
            amount=_nano(payout.amount),
            state=str(payout.state),
            destination=str(self._address(payout.destination or "")),
        )

    # -------------------------------------------------------------------- chat

    async def _rate_limit(self, user_id: int) -> None:
        limiter = RateLimiter(self.dispatcher.redis, self.settings.rate_limit_per_minute)
        wait = await limiter.allow(user_id)
        if wait:
            raise MiniAppError(ErrorCode.RATE_LIMITED, retry_after=wait)

    async def chat(self, caller: Caller, body: p.ChatRequest) -> Turn:
        """Start a turn (held and billed like the bot's); the caller streams its events. The
        text passes through and is kept nowhere: the conversation lives in the page."""
        limit = self.settings.max_prompt_chars
        if any(len(m.content) > limit for m in body.messages):
            raise MiniAppError(ErrorCode.MESSAGE_TOO_LONG, limit=limit)
        if body.messages[-1].role != "user":
            raise MiniAppError(ErrorCode.INVALID_REQUEST, "the last message must be yours")
        await self._rate_limit(caller.user.id)
        messages = body.messages[-self.settings.context_max_messages :]
        conversation = hashlib.sha256(f"{caller.user.id}:{body.conversation}".encode())
        turn = await self.dispatcher.start_turn(
            TurnRequest(
                user_id=caller.user.id,
                model=body.model,
                messages=[ChatMessage(role=m.role, content=m.content) for m in messages],
                # max_tokens: the dispatcher's default_max_tokens, as for the bot and the API
                conversation_id="miniapp-" + conversation.hexdigest()[:32],
            )
        )
        return turn

    def track(self, caller: Caller, turn: Turn) -> str:
        """A token the page can stop ``turn`` with (:meth:`stop`), until :meth:`untrack`."""
        token = secrets.token_urlsafe(16)
        self.running[token] = (caller.user.id, turn)
        return token

    def untrack(self, token: str) -> None:
        self.running.pop(token, None)

    async def drop_unread(self, token: str, turn: Turn) -> None:
        """The page is gone before it read a word of ``turn`` (its response could not start):
        the hold comes back now (:meth:`~backend.dispatch.Turn.end_unread`)."""
        self.untrack(token)
        await turn.end_unread()

    async def stop(self, caller: Caller, token: str) -> None:
        """Stop a reply: it ends with finish reason "cancelled", billed for what was generated
        (the stream still brings its cost). Another user's token is no token."""
        running = self.running.get(token)
        if running is None or running[0] != caller.user.id:
            raise MiniAppError(ErrorCode.NOT_FOUND)
        await running[1].cancel()

    async def privacy(self, done: TurnDone) -> p.PrivacyReport:
        """The privacy report of a finished turn: the worker's proof, and what the backend
        verified about it (its attestation record, while it lasts)."""
        from workers import registry

        worker = done.worker
        try:
            record = await registry.read_attestation(self.dispatcher.redis, worker.worker_id)
        except (redis.RedisError, ValueError):  # the report keeps what the turn itself proved
            record = None
        return p.PrivacyReport(
            worker_id=worker.worker_id,
            tee=worker.tee,
            # The engine its evidence bound (the record), never the worker's own entry's claim.
            engine=record.engine if record else worker.engine,
            engine_version=record.engine_version if record else worker.engine_version,
            off_machine=record.off_machine if record else False,
            key_fingerprint=worker.key_fingerprint,
            image=record.image if record else None,
            mrtd=record.measurements.get("mrtd") if record else None,
            attested_until=(
                _iso(dt.datetime.fromtimestamp(record.expires_at, dt.UTC)) if record else None
            ),
            receipt_id=worker.receipt_id,
        )

    async def balance(self, caller: Caller) -> int:
        return (await self.ledger.balances(caller.user.id)).available
