"""TON Connect from the chat itself (pytonconnect), for people who do not open the Mini App.

The user picks a wallet; the bot opens a TON Connect session through the wallet's bridge and
gives the wallet's universal link as a button. Once the wallet connects:

* top-up: the bot asks the wallet to send the chosen amount to the deposit wallet with the
  user's memo as the comment (the same request the Mini App makes); the deposit watcher
  credits it once it is on chain, and the outbox tells the user;
* payout wallet (providers): the connect request carries a single-use ``ton_proof`` payload;
  the proof is verified (signature, domain, age, payload) before the wallet is linked.

The session's keys live in Redis sealed with the operator's context key, for a few minutes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import nacl.secret
from aiogram import Bot
from pytonconnect import TonConnect
from pytonconnect.storage import IStorage
from redis.asyncio import Redis as AsyncRedis

from backend.db import Database
from backend.settings import Settings
from backend.ton.comment import deposit_transaction, friendly_address
from backend.ton.proof import (
    CHAIN_UNAVAILABLE,
    NO_KEY,
    NO_STATE_INIT,
    ProofError,
    issue_payload,
    link_wallet,
    toncenter_keys,
)
from bot.common import ton
from bot.i18n import _, use_language
from workers.redis_keys import redis_key

log = logging.getLogger("cocoon.bot.tonconnect")

SESSION = "bot:tonconnect"
SESSION_TTL_S = 900
CONNECT_TIMEOUT_S = 300


WALLETS_FILE = Path(__file__).with_name("wallets.json")
"""The wallets the chat offers: those of TON's wallets list that a bot reaches through an HTTP
bridge, each in the shape ``TonConnect.connect`` takes (``bridge_url``, ``universal_url``: what
pytonconnect's ``WalletsListManager`` makes of a list entry). Ours, so nothing is fetched."""


@functools.cache
def _wallets() -> tuple[dict[str, str], ...]:
    return tuple(json.loads(WALLETS_FILE.read_text(encoding="utf-8")))


def wallet_list() -> list[dict[str, Any]]:
    """The wallets the chat offers (:data:`WALLETS_FILE`), in order; copies, for a connector
    to keep."""
    return [dict(wallet) for wallet in _wallets()]


class SealedRedisStorage(IStorage):
    """pytonconnect's storage, one namespace per user, sealed at rest."""

    def __init__(self, redis: AsyncRedis, key: bytes, user_id: int) -> None:
        self.redis = redis
        self.box = nacl.secret.SecretBox(key)
        self.user_id = user_id

    def _key(self, name: str) -> str:
        return redis_key(SESSION, str(self.user_id), name)

    async def set_item(self, key: str, value: str) -> None:
        await self.redis.set(self._key(key), self.box.encrypt(value.encode()), ex=SESSION_TTL_S)

    async def get_item(self, key: str, default_value: str | None = None) -> str | None:
        blob = await self.redis.get(self._key(key))
        if not isinstance(blob, bytes):  # none (or a decoding client's, which cannot open)
            return default_value
        try:
            return self.box.decrypt(blob).decode()
        except Exception:  # a rotated key: the session is gone
            return default_value

    async def remove_item(self, key: str) -> None:
        await self.redis.delete(self._key(key))


class CocoonTonConnect(TonConnect):
    """pytonconnect's TonConnect, for a wallet that sends no ``walletStateInit``: pytonconnect
    0.4 reads that field unguarded, and the KeyError inside its bridge listener would leave
    the connection unanswered. The proof check then says what is missing instead."""

    def _on_wallet_connected(self, payload: Any) -> None:
        items = payload.get("items") if isinstance(payload, dict) else None
        for item in items if isinstance(items, list) else []:
            if isinstance(item, dict) and item.get("name") == "ton_addr":
                item.setdefault("walletStateInit", None)
        super()._on_wallet_connected(payload)


Connector = Any  # pytonconnect.TonConnect, or a test's stand-in with the same methods
ConnectorFactory = Callable[[str, IStorage], Connector]


def account_dict(wallet: Any) -> dict[str, Any]:
    a = wallet.account
    return {
        "address": a.address,
        "network": str(getattr(a.chain, "value", a.chain)),
        "walletStateInit": a.wallet_state_init,
        "publicKey": a.public_key,
    }


def proof_dict(wallet: Any) -> dict[str, Any] | None:
    p = wallet.ton_proof
    if p is None:
        return None
    return {
        "timestamp": p.timestamp,
        "domain": {"lengthBytes": p.domain_len, "value": p.domain_val},
        "signature": base64.b64encode(p.signature).decode(),
        "payload": p.payload,
    }


def proof_refusal(error: ProofError) -> str:
    """What the user reads when their wallet's proof is refused (in the current language)."""
    if error.code == NO_STATE_INIT:
        return _(
            "Your wallet sent no state init and is not deployed yet, so its key cannot be "
            "checked: not linked. Make one transfer from this wallet (that deploys it) or "
            "update the wallet app, then link it again."
        )
    if error.code == NO_KEY:
        return _("Your wallet's public key cannot be read from the chain: not linked.")
    if error.code == CHAIN_UNAVAILABLE:
        return _(
            "Your wallet's key could not be read from the TON network right now: not linked. "
            "Try again in a minute."
        )
    return _("The wallet's proof did not verify: not linked.")


class ChatWallets:
    """Open TON Connect sessions from the chat; one pending connection per user."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        redis: AsyncRedis,
        key: bytes,
        *,
        factory: ConnectorFactory | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.redis = redis
        self.key = key
        self.factory = factory or (lambda url, storage: CocoonTonConnect(url, storage=storage))
        self.tasks: dict[int, asyncio.Task[None]] = {}

    @property
    def manifest_url(self) -> str | None:
        if not self.settings.public_url:
            return None
        return self.settings.public_url.rstrip("/") + "/tonconnect-manifest.json"

    def proof_domains(self) -> list[str]:
        if self.settings.ton.proof_domains:
            return list(self.settings.ton.proof_domains)
        host = urlsplit(self.settings.public_url or "").hostname
        return [host] if host else []

    async def _open(
        self,
        user_id: int,
        wallet_index: int,
        request: dict[str, Any] | None,
        then: Callable[[Any, Any], Awaitable[None]],
    ) -> str | None:
        wallets = wallet_list()
        if self.manifest_url is None or not 0 <= wallet_index < len(wallets):
            return None
        previous = self.tasks.pop(user_id, None)
        if previous is not None:
            previous.cancel()
        connector = self.factory(
            self.manifest_url, SealedRedisStorage(self.redis, self.key, user_id)
        )
        url = await connector.connect(wallets[wallet_index], request)

        async def wait() -> None:
            try:
                wallet = await asyncio.wait_for(connector.wait_for_connection(), CONNECT_TIMEOUT_S)
                if wallet is None or isinstance(wallet, Exception):
                    return
                await then(connector, wallet)
            except TimeoutError:
                log.info("a TON Connect session from the chat was not answered in time")
            except Exception as error:  # the bridge, the wallet: tell nothing secret
                log.warning("TON Connect from the chat failed: %s", type(error).__name__)
            finally:
                self.tasks.pop(user_id, None)
                with contextlib.suppress(Exception):
                    await connector.disconnect()

        self.tasks[user_id] = asyncio.create_task(wait())
        return str(url)

    async def topup(
        self,
        bot: Bot,
        chat_id: int,
        user_id: int,
        memo: str,
        amount: int,
        wallet_index: int,
        language: str,
    ) -> str | None:
        """The wallet's link; when it connects, the wallet is asked for the transfer."""
        address = self.settings.ton.deposit_address
        if not address:
            return None

        async def send(connector: Any, _wallet: Any) -> None:
            request = deposit_transaction(
                address,
                memo,
                amount,
                ttl_s=self.settings.ton.deposit_ttl_s,
                testnet=self.settings.ton.is_testnet,
            )
            with use_language(language):
                await bot.send_message(
                    chat_id, _("Wallet connected. Confirm the transfer in your wallet.")
                )
            try:
                await connector.send_transaction(request)
            except Exception as error:  # the user declined, or the wallet failed
                log.info("TON Connect top-up not sent: %s", type(error).__name__)
                with use_language(language):
                    await bot.send_message(chat_id, _("The transfer was not sent."))
                return
            with use_language(language):
                await bot.send_message(
                    chat_id,
                    _(
                        "Sent {amount}. Your balance is credited once the transfer is on "
                        "chain; I will tell you."
                    ).format(amount=ton(amount)),
                )

        return await self._open(user_id, wallet_index, None, send)

    async def link_payout(
        self, bot: Bot, chat_id: int, user_id: int, wallet_index: int, language: str
    ) -> str | None:
        """The wallet's link; when it connects, its ton_proof is verified and it becomes the
        provider's payout wallet."""
        payload = await issue_payload(self.db, self.settings.ton.proof_ttl_s)

        async def link(_connector: Any, wallet: Any) -> None:
            proof = proof_dict(wallet)
            with use_language(language):
                if proof is None:
                    await bot.send_message(chat_id, _("The wallet sent no proof: not linked."))
                    return
                try:
                    linked = await link_wallet(
                        self.db,
                        user_id,
                        "payout",
                        account_dict(wallet),
                        proof,
                        allowed_domains=self.proof_domains(),
                        max_age_s=self.settings.ton.proof_ttl_s,
                        network="-3" if self.settings.ton.is_testnet else "-239",
                        chain=toncenter_keys(self.settings.ton),
                    )
                except ProofError as error:
                    log.info("a payout wallet proof was refused: %s", error)
                    await bot.send_message(chat_id, proof_refusal(error))
                    return
                address = friendly_address(
                    linked.address, bounceable=False, testnet=self.settings.ton.is_testnet
                )
                await bot.send_message(
                    chat_id, _("Payout wallet linked: {address}").format(address=address)
                )

        return await self._open(user_id, wallet_index, {"ton_proof": payload}, link)

    async def close(self) -> None:
        for task in list(self.tasks.values()):
            task.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks.values()), timeout=5)
