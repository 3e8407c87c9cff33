"""A local TON Center: the v3 endpoints Cocoon uses, over real BOCs, on loopback.

For tests and for development (``cocoon ton localnet``). It keeps accounts and their
transactions in memory, executes wallet v4r2 external messages the way the wallet contract
does (signature, subwallet, valid_until and seqno checked; seqno bumped; transfers paid while
the balance lasts, mode 3 ignoring errors), and lets a test:

- add incoming transactions (``add_incoming``: any value, comment, raw body, bounceable or not,
  bounced, aborted, external), also over HTTP (``POST /localnet/deposit``) for a browser
  session. Accounts behave as on chain: one that was never deployed (``nonexist``, then
  ``uninit``) aborts every incoming transaction (compute skipped, ``no_state``) and keeps a
  non-bounceable value, while a bounceable one bounces back to its sender (bounce phase ``ok``,
  the value less the bounce fee); wallets and ``deploy``-ed accounts are ``active``;
- serve a transaction only later (``indexed=False``, then ``index``): the real indexer
  commits in parallel, so a lower ``lt`` can become visible after a higher one;
- look transactions up by message hash as TON Center does (raw or normalized hash), or as an
  indexer that knows only one of them (``match_raw_hashes``, ``match_normalized_hashes``);
- see what was sent (``received``: every BOC posted) and what executed (``executed``);
- keep jettons (``add_jetton``, ``mint_jetton``, ``transfer_jetton``): a master answers
  ``get_wallet_address`` and its wallets ``get_wallet_data`` through ``runGetMethod``; a
  transfer moves the balance between the owners' jetton wallets and, with a forward amount,
  sends the receiver's owner a ``transfer_notification`` from the receiver's jetton wallet;
- keep Highload Wallet v3 hot wallets (``add_highload_wallet``) and run their external
  messages as the contract does: signature, subwallet, timeout and ``created_at`` checked, the
  query id looked up in the two query dictionaries (replay refused) and set, the dictionaries
  cleaned after ``timeout``; after the commit a message with a state init or a source is
  dropped (the query id stays used), else sent with +2 (ignore errors); an
  ``internal_transfer`` to itself runs its action list in a second transaction (up to 255
  actions), each transfer paid while the balance lasts; ``processed?`` answers as the get-method;
- make the API fail (``faults``: statuses to answer the next requests with), make the
  network lose messages (``drop_messages``: accept them and never execute them), or make
  seqno reads lag behind (``stale_seqno_reads``);
- limit the rate as TON Center does (``rps``: 1 request per second without an API key, 10 on
  the free plan): a request past it within a second is answered 429 ``Ratelimit exceed``.

Pages hold at most 1,000 transactions (a larger ``limit`` is a 422), as on TON Center. The
chain lives in :mod:`backend.ton.localnet_chain`, jettons in :mod:`backend.ton.localnet_jettons`,
the hot wallets' external messages in :mod:`backend.ton.localnet_wallets`; this module serves
them over HTTP.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.typedefs import Handler

from backend.sites import start_site
from backend.ton.comment import raw_address
from backend.ton.localnet_chain import BOUNCE_FEE, LocalHighload, LocalWallet, hash_key
from backend.ton.localnet_jettons import jetton_notification
from backend.ton.localnet_wallets import LocalWallets
from backend.ton.wallet import WalletError

__all__ = [
    "BOUNCE_FEE",
    "LocalHighload",
    "LocalTonCenter",
    "LocalTonCenterServer",
    "LocalWallet",
    "jetton_notification",
]


@dataclass
class LocalTonCenter(LocalWallets):
    """The chain (:mod:`backend.ton.localnet_chain`, ``_jettons``, ``_wallets``) served over
    TON Center's v3 HTTP API by :meth:`create_app`."""

    rps: int | None = None  # requests per second before 429, as TON Center; None: no limit
    rate_clock: Callable[[], float] = time.monotonic  # the limit's seconds (wall time)
    _recent: collections.deque[float] = field(default_factory=collections.deque)

    def create_app(self) -> web.Application:
        app = web.Application(middlewares=[self._faults_middleware])
        app.router.add_get("/api/v3/transactions", self._transactions)
        app.router.add_get("/api/v3/transactionsByMessage", self._by_message)
        app.router.add_get("/api/v3/walletInformation", self._wallet_information)
        app.router.add_post("/api/v3/message", self._message)
        app.router.add_post("/api/v3/runGetMethod", self._run_get_method)
        app.router.add_post("/localnet/deposit", self._deposit)
        return app

    @web.middleware
    async def _faults_middleware(
        self, request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        self.requests += 1
        if self.rps is not None and request.path.startswith("/api/") and self._limited():
            return web.json_response(
                {"ok": False, "result": "Ratelimit exceed", "code": 429}, status=429
            )
        if self.faults and request.path.startswith("/api/"):
            status = self.faults.pop(0)
            if status is not None:
                return web.json_response({"ok": False, "error": "injected fault"}, status=status)
        return await handler(request)

    def _limited(self) -> bool:
        """Whether this request is past ``rps`` in the last second of ``rate_clock`` (not
        ``clock``, which tests move by hand); a refused one does not count."""
        now = self.rate_clock()
        while self._recent and self._recent[0] <= now - 1.0:
            self._recent.popleft()
        if len(self._recent) >= (self.rps or 0):
            return True
        self._recent.append(now)
        return False

    async def _transactions(self, request: web.Request) -> web.Response:
        query = request.query
        try:
            account = raw_address(query["account"])
            start_lt = int(query.get("start_lt", 0))
            end_lt = int(query["end_lt"]) if "end_lt" in query else None
            limit = int(query.get("limit", 10))
            offset = int(query.get("offset", 0))
        except (KeyError, ValueError) as error:
            return web.json_response({"error": f"bad request: {error}"}, status=422)
        if not 1 <= limit <= 1000:
            return web.json_response({"error": "limit must be 1..1000"}, status=422)
        sort = query.get("sort", "desc")  # TON Center's default: newest first
        if sort not in ("asc", "desc"):
            return web.json_response({"error": "sort must be asc or desc"}, status=422)
        txs = [
            tx
            for tx in self.accounts.get(account, [])
            if int(tx["lt"]) >= start_lt
            and (end_lt is None or int(tx["lt"]) <= end_lt)
            and tx["hash"] not in self.unindexed
        ]
        txs.sort(key=lambda tx: int(tx["lt"]), reverse=sort == "desc")
        return web.json_response({"transactions": txs[offset : offset + limit], "address_book": {}})

    async def _by_message(self, request: web.Request) -> web.Response:
        try:
            key = hash_key(request.query["msg_hash"])
        except (KeyError, ValueError):
            return web.json_response({"error": "bad msg_hash"}, status=422)
        tx = (self._by_raw.get(key) if self.match_raw_hashes else None) or (
            self._by_norm.get(key) if self.match_normalized_hashes else None
        )
        if tx is not None and tx["hash"] in self.unindexed:
            tx = None
        return web.json_response({"transactions": [tx] if tx else [], "address_book": {}})

    async def _wallet_information(self, request: web.Request) -> web.Response:
        try:
            address = raw_address(request.query["address"])
        except (KeyError, ValueError):
            return web.json_response({"error": "bad address"}, status=422)
        wallet = self.wallets.get(address)
        if wallet is None:
            return web.json_response({"balance": "0", "status": "uninit", "seqno": 0})
        seqno = wallet.seqno
        if self.stale_seqno_reads > 0 and seqno > 0:
            self.stale_seqno_reads -= 1
            seqno -= 1
        return web.json_response(
            {
                "balance": str(wallet.balance),
                "status": "active",
                "wallet_type": "wallet v4 r2",
                "seqno": seqno,
                "wallet_id": wallet.subwallet_id,
            }
        )

    async def _run_get_method(self, request: web.Request) -> web.Response:
        """``get_public_key`` and ``seqno`` of the wallets it knows (a test may change a
        wallet's ``public_key``, as a Telegram wallet's key rotation does); exit code -13 for
        any other account (no code), 11 for any other method."""
        try:
            body = await request.json()
            address = raw_address(body["address"])
            method = str(body["method"])
        except (ValueError, KeyError, TypeError) as error:
            return web.json_response(
                {"error": f"send JSON {{address, method, stack}}: {error}"}, status=422
            )
        jetton = self._jetton_get_method(address, method, body.get("stack"))
        if jetton is not None:
            return web.json_response(jetton)
        if address in self.highload and self.status_of(address) == "active":
            return web.json_response(self._highload_get_method(address, method, body.get("stack")))
        wallet = self.wallets.get(address)
        if wallet is None:
            return web.json_response({"gas_used": 0, "exit_code": -13, "stack": []})
        values = {"get_public_key": int.from_bytes(wallet.public_key, "big"), "seqno": wallet.seqno}
        if method not in values:
            return web.json_response({"gas_used": 0, "exit_code": 11, "stack": []})
        stack = [{"type": "num", "value": hex(values[method])}]
        return web.json_response({"gas_used": 1000, "exit_code": 0, "stack": stack})

    async def _message(self, request: web.Request) -> web.Response:
        try:
            boc = (await request.json())["boc"]
        except (ValueError, KeyError, TypeError):
            return web.json_response({"error": "send a JSON body with boc"}, status=422)
        self.received.append(boc)
        try:
            return web.json_response(self.accept_external(boc))
        except (ValueError, WalletError) as error:
            return web.json_response({"error": f"not accepted: {error}"}, status=400)

    async def _deposit(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            tx = self.add_incoming(
                body["account"],
                int(body["value"]),
                comment=body.get("comment"),
                source=body.get("source") or "0:" + "AB" * 32,
                bounce=body.get("bounce") is True,
            )
        except (ValueError, KeyError, TypeError) as error:
            return web.json_response(
                {"error": f"send JSON {{account, value, comment?, source?, bounce?}}: {error}"},
                status=422,
            )
        return web.json_response({"lt": tx["lt"], "hash": tx["hash"]})


class LocalTonCenterServer:
    """``async with LocalTonCenterServer(net) as url:`` serves ``net`` on 127.0.0.1."""

    def __init__(self, net: LocalTonCenter, host: str = "127.0.0.1", port: int = 0) -> None:
        self.net = net
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> str:
        self._runner = await start_site(
            self.net.create_app(), self.host, self.port, access_log=None
        )
        port = self._runner.addresses[0][1]  # the one site's (host, port, ...)
        return f"http://{self.host}:{port}"

    async def __aexit__(self, *_exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
