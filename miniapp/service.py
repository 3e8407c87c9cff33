"""What the Mini App does, apart from HTTP: one plain class over the backend's services.

Routes (``miniapp.routes``) parse and render; money, wallets and turns go through the shared
backend layers (``backend.accounts``, ``backend.ton``, the ledger and the dispatcher), so the
Mini App follows the same rules as the bot. Wallets, top-ups and Stars invoices are its
:class:`miniapp.wallets.WalletService` part.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import secrets
from typing import TYPE_CHECKING, Literal

import redis

from backend import accounts
from backend.accounts.economics import economics
from backend.db import Database
from backend.dispatch import Dispatcher, Turn, TurnDone, TurnRequest
from backend.errors import ErrorCode
from backend.i18n import pick_language
from backend.ledger import Ledger
from backend.ratelimit import RateLimiter
from backend.settings import Settings
from backend.ton import proof as ton_proof
from backend.ton.jettons import USDT_DECIMALS
from backend.users import get_or_create_user
from miniapp import protocol as p
from miniapp.auth import TelegramCaller
from miniapp.caller import Caller, MiniAppError, iso, nano, read_amount
from miniapp.wallets import STARS_PRESETS, TOPUP_PRESETS, USDT_PRESETS, WalletService
from workers.wire import ChatMessage

if TYPE_CHECKING:
    from aiogram import Bot

__all__ = ["Caller", "MiniApp", "MiniAppError"]


class MiniApp(WalletService):
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

    async def me(self, caller: Caller) -> p.Me:
        user = caller.user
        balances = await self.ledger.balances(user.id)
        wallet = await ton_proof.linked_wallet(self.db, user.id, "user")
        payout = await ton_proof.linked_wallet(self.db, user.id, "payout")
        models = [
            p.ModelView(
                id=name,
                prompt=nano(price.prompt),
                completion=nano(price.completion),
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
            balance=p.Balance(available=nano(balances.available), held=nano(balances.held)),
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
                nano_per_star=nano(self.settings.stars_nano_per_star),
                usdt=self.settings.ton.takes_usdt,
                nano_per_usdt=nano(self.settings.ton.usdt_nano_per_micro * 10**USDT_DECIMALS)
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
                    at=iso(item.at) or "",
                    amount=nano(item.amount),
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
                    attestation_expires_at=iso(w.expires_at),
                    jobs=w.jobs,
                    earned=nano(w.earned),
                )
                for w in workers
            ],
            earnings=p.EarningsView(
                available=nano(earned.available),
                pending=nano(earned.pending),
                paid=nano(earned.paid),
                earned=nano(earned.earned),
                jobs=earned.jobs,
            ),
            payout_wallet=self._wallet_view(payout),
            min_withdrawal=nano(self.settings.min_withdrawal_nano),
            economics=p.EconomicsView(
                online_s=x.online_s,
                tokens=x.tokens,
                per_hour=None if x.per_hour is None else nano(x.per_hour),
                per_million_tokens=None
                if x.per_million_tokens is None
                else nano(x.per_million_tokens),
                fees=nano(x.fees),
                fee_bps=x.fee_bps,
                next_payout=p.NextPayoutView(
                    kind=x.next_payout.kind,
                    at=iso(x.next_payout.at),
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
            amount = read_amount(caller, body.amount)
        payout = await accounts.withdraw(  # AccountError: the routes answer it
            self.ledger,
            self.settings,
            caller.user.id,
            amount,
            f"miniapp:{caller.user.id}:{body.key}",
        )
        return p.PayoutView(
            id=payout.id,
            amount=nano(payout.amount),
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
                iso(dt.datetime.fromtimestamp(record.expires_at, dt.UTC)) if record else None
            ),
            receipt_id=worker.receipt_id,
        )

    async def balance(self, caller: Caller) -> int:
        return (await self.ledger.balances(caller.user.id)).available
