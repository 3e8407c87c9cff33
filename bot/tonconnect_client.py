"""pytonconnect's connector as the bot uses it: the wallets of TON's wallets list with their HTTP
bridges (pytonconnect's source and its built-in list when that cannot be read), a bridge
connection that retries with a backoff and gives up, and a connector that can be closed.

pytonconnect 0.4 restarts a failed bridge subscription at once and forever (an unreachable
bridge meant dozens of tracebacks a second until the process stopped), and has no public way to
close a connection that never connected (``disconnect`` refuses: "not connected"). Both fixes
reach into its provider and gateway, here only; ``tests/test_bot_tonconnect.py`` runs them
against the real library on a loopback bridge, so a change of its internals fails there.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx
from httpx_sse import aconnect_sse
from pytonconnect import TonConnect, WalletsListManager
from pytonconnect._wallets_list_manager import FALLBACK_WALLETS_LIST
from pytonconnect.exceptions import UserRejectsError
from pytonconnect.parsers import ConnectEventParser
from pytonconnect.provider import BridgeProvider
from pytonconnect.provider._bridge_gateway import BridgeGateway
from pytonconnect.storage import IStorage

from workers.backoff import Backoff, sleep_or_stop

log = logging.getLogger("cocoon.bot.tonconnect")

__all__ = [
    "BRIDGE_GIVE_UP",
    "BridgeUnreachable",
    "CocoonTonConnect",
    "WalletsList",
    "public_https",
    "usable_wallets",
]

BRIDGE_GIVE_UP = 6
"""Failed subscriptions in a row (no event, not even a heartbeat, in between) after which a
connector stops trying its bridge (with the default backoff, about half a minute)."""

USER_DECLINED = 300
"""TON Connect's error code: the user declined in the wallet."""

MAX_WALLETS = 8
"""Wallets the chat offers at most (the first of the list with an HTTP bridge)."""

CALLBACK_ID_MAX = 24
"""A wallet is named in callback data by its ``app_name`` (or name): at most this long."""


class BridgeUnreachable(Exception):
    """The wallet's bridge could not be subscribed to."""


def public_https(url: str | None) -> bool:
    """Whether a wallet app on a phone can fetch ``url``: https, and a host that is not
    loopback, private or link-local."""
    if not url:
        return False
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme != "https" or not host or host == "localhost" or host.endswith(".local"):
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return "." in host
    return address.is_global


def wallet_id(wallet: dict[str, Any]) -> str:
    return str(wallet.get("app_name") or wallet.get("name") or "")


def _bridge_url(entry: dict[str, Any]) -> Any:
    """The wallet's HTTP bridge: ``bridge_url`` (pytonconnect's shape), else the first
    ``sse`` bridge of the wallets list's ``bridge`` entries (what pytonconnect takes)."""
    if "bridge_url" in entry:
        return entry["bridge_url"]
    bridges = entry.get("bridge")
    for bridge in bridges if isinstance(bridges, list) else []:
        if isinstance(bridge, dict) and bridge.get("type") == "sse":
            return bridge.get("url")
    return None


def usable_wallets(entries: Any) -> list[dict[str, Any]]:
    """The wallets of a wallets list (TON's ``wallets-v2.json`` shape, or pytonconnect's) a bot
    can reach: an HTTP bridge and a universal link (http or https), a name that fits in
    callback data; in pytonconnect's shape (``bridge_url``, ``universal_url``), at most
    :data:`MAX_WALLETS`."""
    found: list[dict[str, Any]] = []
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict):
            continue
        bridge, link, ident = _bridge_url(entry), entry.get("universal_url"), wallet_id(entry)
        if not (isinstance(bridge, str) and urlsplit(bridge).scheme in {"http", "https"}):
            continue
        if not (isinstance(link, str) and urlsplit(link).scheme in {"http", "https"}):
            continue
        if not ident or len(ident) > CALLBACK_ID_MAX or ":" in ident:
            continue
        if any(wallet_id(w) == ident for w in found):
            continue
        found.append(
            {
                "name": str(entry.get("name") or ident)[:64],
                "app_name": entry.get("app_name"),
                "image": entry.get("image"),
                "about_url": entry.get("about_url"),
                "bridge_url": bridge,
                "universal_url": link,
            }
        )
        if len(found) == MAX_WALLETS:
            break
    return found


class WalletsList:
    """TON's wallets list, read from ``source`` (pytonconnect's by default) at most once an
    hour, without blocking the event loop; pytonconnect's built-in list while it cannot be
    read (tried again after a few minutes)."""

    def __init__(
        self,
        source: str | None,
        *,
        ttl_s: float = 3600,
        retry_s: float = 300,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source or WalletsListManager._wallets_list_source
        self.ttl_s, self.retry_s, self.clock = ttl_s, retry_s, clock
        self.cached: list[dict[str, Any]] = []
        self.expires = float("-inf")
        self.lock = asyncio.Lock()

    async def get(self) -> list[dict[str, Any]]:
        async with self.lock:
            if self.clock() < self.expires:
                return [dict(w) for w in self.cached]
            try:
                async with httpx.AsyncClient(timeout=5.0) as client:
                    response = await client.get(self.source)
                    response.raise_for_status()
                    found = usable_wallets(response.json())
                if not found:
                    raise ValueError("no wallet with an HTTP bridge")
                self.cached, self.expires = found, self.clock() + self.ttl_s
            except Exception as error:
                log.warning(
                    "TON's wallets list could not be read (%s): pytonconnect's own list",
                    type(error).__name__,
                )
                self.cached = usable_wallets(FALLBACK_WALLETS_LIST)
                self.expires = self.clock() + self.retry_s
            return [dict(w) for w in self.cached]


class _Gateway(BridgeGateway):
    """pytonconnect's bridge gateway, restarting after a :class:`Backoff` instead of at once,
    and closing itself after :data:`BRIDGE_GIVE_UP` failures in a row."""

    def __init__(self, *args: Any, backoff: Backoff, gave_up: asyncio.Event, **kw: Any):
        super().__init__(*args, **kw)
        self.backoff = backoff
        self.gave_up = gave_up
        self.restarting = False
        self.retry: asyncio.Task[bool] | None = None
        self.stopped = asyncio.Event()

    async def register_session(  # pytonconnect's signature
        self,
        timeout: float = BridgeGateway.DEFAULT_TIMEOUT,  # noqa: ASYNC109
        bridge_url: str | None = None,
    ) -> bool:
        if self.restarting:  # the listener failed: wait, or give up
            if self.backoff.failures >= BRIDGE_GIVE_UP:
                log.warning("a TON Connect bridge failed %d times in a row: closed", BRIDGE_GIVE_UP)
                self.close()
                self.gave_up.set()
                return False
            await sleep_or_stop(self.stopped, self.backoff.failed())
        self.restarting = False
        if self._is_closed:
            return False
        result: bool = await super().register_session(timeout, bridge_url)
        return result

    async def listen_event_source(  # pytonconnect's signature
        self,
        resolve: asyncio.Future[bool],
        url: str,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> None:
        """pytonconnect's subscription, which also counts a refused one (an error status or
        not an event stream) as failed, logs one line instead of a traceback, and leaves the
        next try to :meth:`register_session`'s backoff."""
        headers = {"Authorization": f"Bearer {self._api_token}"} if self._api_token else {}
        failed = False
        try:
            async with httpx.AsyncClient() as client:
                async with aconnect_sse(
                    client, "GET", url, headers=headers, timeout=timeout
                ) as source:
                    response = source.response
                    kind = response.headers.get("content-type", "")
                    if response.status_code != 200 or "text/event-stream" not in kind:
                        raise BridgeUnreachable(f"HTTP {response.status_code} {kind}")
                    self._event_source = source
                    resolve.set_result(True)
                    try:
                        async for event in source.aiter_sse():
                            await self._messages_handler(event)
                    except httpx.ReadTimeout:  # nothing for a while: subscribe again
                        failed = True
        except asyncio.CancelledError:  # paused or closed
            pass
        except Exception as error:
            log.info("a TON Connect bridge subscription failed: %s", type(error).__name__)
            failed = True
        finally:
            if not resolve.done():
                resolve.set_result(False)
        if failed and not self._is_closed:
            self.restarting = True
            self.retry = asyncio.create_task(self.register_session())

    def close(self) -> None:
        super().close()
        self.stopped.set()

    async def send(
        self, request: str, receiver_public_key: str, topic: str, ttl: int | None = None
    ) -> None:
        """pytonconnect's POST to the bridge, with the body as ``content`` (httpx deprecates
        raw bytes as ``data``), refusing an error answer instead of ignoring it."""
        headers = {"Content-type": "text/plain;charset=UTF-8"}
        if self._api_token is not None:
            headers["Authorization"] = f"Bearer {self._api_token}"
        params = {
            "client_id": self._session_id,
            "to": receiver_public_key,
            "ttl": str(ttl or self.DEFAULT_TTL),
            "topic": topic,
        }
        url = self._bridge_url.rstrip("/") + "/" + self.POST_PATH
        async with httpx.AsyncClient(timeout=self.DEFAULT_TIMEOUT) as client:
            response = await client.post(url, params=params, content=request, headers=headers)
            response.raise_for_status()

    async def _messages_handler(self, event: Any) -> None:
        self.backoff.succeeded()  # the bridge answers (a heartbeat is enough)
        await super()._messages_handler(event)


class _Provider(BridgeProvider):
    """pytonconnect's bridge provider with :class:`_Gateway`; it remembers whether the first
    subscription opened."""

    def __init__(self, *args: Any, backoff: Backoff, gave_up: asyncio.Event, **kw: Any):
        super().__init__(*args, **kw)
        self.backoff = backoff
        self.gave_up = gave_up
        self.opened = False

    async def _open_gateways(self, auto_listen: bool = True) -> None:
        if isinstance(self._wallet, dict):
            self._gateway = _Gateway(
                self._storage,
                self._session.bridge_url,
                self._session.session_crypto.session_id,
                self._gateway_listener,
                self._gateway_errors_listener,
                api_tokens=self._api_tokens,
                backoff=self.backoff,
                gave_up=self.gave_up,
            )
            if auto_listen:
                self.opened = await self._gateway.register_session()


class CocoonTonConnect(TonConnect):
    """pytonconnect's TonConnect with a bounded bridge connection:

    * :meth:`connect` raises :class:`BridgeUnreachable` (and closes) when the wallet's bridge
      cannot be subscribed to, rather than hand out a link that cannot work;
    * :attr:`gave_up` is set when the bridge failed :data:`BRIDGE_GIVE_UP` times in a row;
    * :meth:`close` ends the bridge connection, connected or not;
    * a wallet that sends no ``walletStateInit`` is read as one without (pytonconnect 0.4
      reads the field unguarded and the KeyError would leave the connection unanswered); the
      proof check then says what is missing.
    """

    def __init__(
        self,
        manifest_url: str,
        storage: IStorage,
        *,
        wallets_list_source: str | None = None,
        wallets_list_cache_ttl: int | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        super().__init__(
            manifest_url,
            storage=storage,
            wallets_list_source=wallets_list_source,
            wallets_list_cache_ttl=wallets_list_cache_ttl,
        )
        self.backoff = backoff or Backoff(0.5, 15.0)
        self.gave_up = asyncio.Event()

    def _create_provider(self, wallet: dict[str, Any]) -> BridgeProvider:
        provider = _Provider(
            self._storage,
            wallet,
            api_tokens=self._api_tokens,
            backoff=self.backoff,
            gave_up=self.gave_up,
        )
        provider.listen(self._wallet_events_listener)
        return provider

    async def connect(self, wallet: dict[str, Any], request: Any = None) -> str:
        url = await super().connect(wallet, request)
        if not getattr(self._provider, "opened", False):
            self.close()
            raise BridgeUnreachable(str(wallet.get("bridge_url")))
        return str(url)

    def _on_wallet_connected(self, payload: Any) -> None:
        items = payload.get("items") if isinstance(payload, dict) else None
        for item in items if isinstance(items, list) else []:
            if isinstance(item, dict) and item.get("name") == "ton_addr":
                item.setdefault("walletStateInit", None)
        super()._on_wallet_connected(payload)

    def _on_wallet_connect_error(self, payload: Any) -> None:
        """The wallet refused to connect: told to whoever waits. pytonconnect 0.4 maps code
        300 (the user declined) to ManifestNotFoundError (a duplicate key in its table), and
        raises that inside its bridge listener, which restarts the subscription."""
        code = payload.get("code") if isinstance(payload, dict) else None
        if code == USER_DECLINED:
            error: Exception = UserRejectsError(payload.get("message"))
        else:
            error = ConnectEventParser.parse_error(payload if isinstance(payload, dict) else {})
        for listener in list(self._status_change_error_subscriptions):
            listener(error)

    def close(self) -> None:
        """End the bridge connection (no more requests to the bridge), connected or not."""
        provider = self._provider
        if provider is not None:
            provider.close_connection()

    async def finish(self, timeout_s: float = 5.0) -> None:
        """Tell a connected wallet the session is over (within ``timeout_s``), then close."""
        if self.connected:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.disconnect(), timeout_s)
        self.close()
