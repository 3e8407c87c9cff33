"""TON Connect from the chat itself (pytonconnect), for people who do not open the Mini App.

The user picks a wallet of TON's wallets list (one with an HTTP bridge); the bot opens a TON
Connect session through that wallet's bridge and gives the wallet's universal link as a
button. Once the wallet connects:

* top-up: the bot asks the wallet to send the chosen amount to the deposit wallet with the
  user's memo as the comment (the same request the Mini App makes); the deposit watcher
  credits it once it is on chain, and the outbox tells the user;
* payout wallet (providers): the connect request carries a single-use ``ton_proof`` payload;
  the proof is verified (signature, domain, age, payload) before the wallet is linked.

Every ending is told to the user: connected and sent, declined, not answered in time, the
bridge lost; the connection to the bridge is closed in each (and when the user cancels, or
picks another wallet). TON Connect is offered only where it can work: a public https address
for the manifest (a wallet app fetches it), and a deposit wallet for top-ups.

The session's keys live in Redis sealed with the operator's context key, for a few minutes.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import nacl.secret
from aiogram import Bot
from pytonconnect.exceptions import UserRejectsError
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
from bot.tonconnect_client import (
    BridgeUnreachable,
    CocoonTonConnect,
    WalletsList,
    public_https,
    wallet_id,
)
from workers.redis_keys import redis_key

log = logging.getLogger("cocoon.bot.tonconnect")

SESSION = "bot:tonconnect"
SESSION_TTL_S = 900
CONNECT_TIMEOUT_S = 300


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


Connector = Any  # CocoonTonConnect (or a test's subclass of it)
ConnectorFactory = Callable[[str, IStorage], Connector]


class WalletError(Exception):
    """TON Connect cannot start: ``unavailable`` (not offered here, or an unknown wallet) or
    ``unreachable`` (the wallet's bridge does not answer)."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


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
        timeout_s: float = CONNECT_TIMEOUT_S,
    ) -> None:
        self.settings = settings
        self.db = db
        self.redis = redis
        self.key = key
        self.factory: ConnectorFactory = factory or (
            lambda url, storage: CocoonTonConnect(url, storage)
        )
        self.timeout_s = timeout_s
        self.lists = WalletsList(settings.tonconnect_wallets_url)
        self.tasks: dict[int, asyncio.Task[None]] = {}

    @property
    def manifest_url(self) -> str | None:
        if not public_https(self.settings.public_url):
            return None
        return str(self.settings.public_url).rstrip("/") + "/tonconnect-manifest.json"

    def available(self, *, topup: bool) -> bool:
        """Whether TON Connect can work here: a manifest a wallet app can fetch, and a
        deposit wallet for top-ups."""
        if self.manifest_url is None:
            return False
        return bool(self.settings.ton.deposit_address) or not topup

    async def wallets(self) -> list[dict[str, Any]]:
        """The wallets offered: TON's wallets list (``COCOON_TONCONNECT_WALLETS_URL`` or
        pytonconnect's source, read once an hour; pytonconnect's built-in list when it cannot
        be read), those a bot reaches through an HTTP bridge."""
        return await self.lists.get()

    def proof_domains(self) -> list[str]:
        if self.settings.ton.proof_domains:
            return list(self.settings.ton.proof_domains)
        host = urlsplit(self.settings.public_url or "").hostname
        return [host] if host else []

    def cancel(self, user_id: int) -> bool:
        """End the user's pending connection (its bridge connection closes); whether one was."""
        task = self.tasks.pop(user_id, None)
        if task is None or task.done():
            return False
        task.cancel()
        return True

    async def _open(
        self,
        bot: Bot,
        chat_id: int,
        user_id: int,
        wallet_key: str,
        request: dict[str, Any] | None,
        then: Callable[[Any, Any], Awaitable[None]],
        language: str,
    ) -> tuple[str, str]:
        """The wallet's name and universal link; raises :class:`WalletError`."""
        manifest = self.manifest_url
        if manifest is None:
            raise WalletError("unavailable")
        wallet = next((w for w in await self.wallets() if wallet_id(w) == wallet_key), None)
        if wallet is None:
            raise WalletError("unavailable")
        self.cancel(user_id)
        connector = self.factory(manifest, SealedRedisStorage(self.redis, self.key, user_id))
        try:
            url = await connector.connect(wallet, request)
        except BridgeUnreachable as error:
            log.warning("a TON Connect bridge could not be reached: %s", error)
            raise WalletError("unreachable") from None
        except Exception as error:
            connector.close()
            log.warning("TON Connect from the chat could not start: %s", type(error).__name__)
            raise WalletError("unreachable") from None

        async def tell(text: Callable[[], str]) -> None:
            with use_language(language):
                await bot.send_message(chat_id, text())

        async def wait() -> None:
            lost = asyncio.ensure_future(connector.gave_up.wait())
            try:
                connected = connector.wait_for_connection()
                finished, _pending = await asyncio.wait(
                    {connected, lost},
                    timeout=self.timeout_s,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if not finished:
                    await tell(lambda: _("The wallet did not answer in time: nothing was done."))
                    return
                if not connected.done():
                    await tell(
                        lambda: _(
                            "The connection to your wallet was lost: nothing was done. "
                            "Try again, or use another way to pay."
                        )
                    )
                    return
                wallet_info = connected.result()
                if isinstance(wallet_info, UserRejectsError):
                    await tell(lambda: _("You declined the connection in your wallet."))
                    return
                if wallet_info is None or isinstance(wallet_info, Exception):
                    await tell(lambda: _("The wallet did not connect: nothing was done."))
                    return
                await then(connector, wallet_info)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the bridge, the wallet, Telegram: tell nothing secret
                log.warning("TON Connect from the chat failed: %s", type(error).__name__)
            finally:
                lost.cancel()
                if self.tasks.get(user_id) is asyncio.current_task():
                    del self.tasks[user_id]
                await connector.finish()

        self.tasks[user_id] = asyncio.create_task(wait())
        return str(wallet.get("name")), str(url)

    async def topup(
        self,
        bot: Bot,
        chat_id: int,
        user_id: int,
        memo: str,
        amount: int,
        wallet_key: str,
        language: str,
    ) -> tuple[str, str]:
        """The wallet's name and link; when it connects, the wallet is asked for the
        transfer. Raises :class:`WalletError`."""
        address = self.settings.ton.deposit_address
        if not address or not self.available(topup=True):
            raise WalletError("unavailable")

        async def send(connector: Any, _wallet: Any) -> None:
            asked = deposit_transaction(
                address,
                memo,
                amount,
                ttl_s=self.settings.ton.deposit_ttl_s,
                testnet=self.settings.ton.is_testnet,
            )
            request = {  # pytonconnect's names (it sends them as the protocol's)
                "valid_until": asked["validUntil"],
                "network": "-3" if self.settings.ton.is_testnet else "-239",
                "messages": asked["messages"],
            }
            with use_language(language):
                await bot.send_message(
                    chat_id, _("Wallet connected. Confirm the transfer in your wallet.")
                )
            try:
                await asyncio.wait_for(connector.send_transaction(request), self.timeout_s)
            except UserRejectsError:
                with use_language(language):
                    await bot.send_message(
                        chat_id, _("You declined the transfer: nothing was sent.")
                    )
                return
            except Exception as error:  # no answer in time, or the wallet failed
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

        return await self._open(bot, chat_id, user_id, wallet_key, None, send, language)

    async def link_payout(
        self, bot: Bot, chat_id: int, user_id: int, wallet_key: str, language: str
    ) -> tuple[str, str]:
        """The wallet's name and link; when it connects, its ton_proof is verified and it
        becomes the provider's payout wallet. Raises :class:`WalletError`."""
        if not self.available(topup=False):
            raise WalletError("unavailable")
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

        request = {"ton_proof": payload}
        return await self._open(bot, chat_id, user_id, wallet_key, request, link, language)

    async def close(self) -> None:
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
