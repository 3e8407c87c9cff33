"""A local TON Center: the v3 endpoints Cocoon uses, over real BOCs, on loopback.

For tests and for development (``cocoon ton localnet``). It keeps accounts and their
transactions in memory, executes wallet v4r2 external messages the way the wallet contract
does (signature, subwallet, valid_until and seqno checked; seqno bumped; transfers paid while
the balance lasts, mode 3 ignoring errors), and lets a test:

- add incoming transactions (``add_incoming``: any value, comment, raw body, bounced, aborted,
  external), also over HTTP (``POST /localnet/deposit``) for a browser session;
- see what was sent (``received``: every BOC posted) and what executed (``executed``);
- make the API fail (``faults``: statuses to answer the next requests with), make the
  network lose messages (``drop_messages``: accept them and never execute them), or make
  seqno reads lag behind (``stale_seqno_reads``).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from pytoniq_core import Address, Cell, begin_cell

from backend.ton.comment import comment_cell, raw_address
from backend.ton.wallet import ParsedExternal, WalletError, parse_external


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _hash_key(text: str) -> str:
    """hex or base64 (std or url-safe) → hex."""
    text = text.strip()
    if len(text) == 64:
        return text.lower()
    padded = text.replace("-", "+").replace("_", "/") + "=" * (-len(text) % 4)
    return base64.b64decode(padded).hex()


@dataclass
class LocalWallet:
    public_key: bytes
    subwallet_id: int
    seqno: int = 0
    balance: int = 0


@dataclass
class LocalTonCenter:
    clock: Callable[[], float] = time.time
    accounts: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    wallets: dict[str, LocalWallet] = field(default_factory=dict)
    received: list[str] = field(default_factory=list)
    executed: list[ParsedExternal] = field(default_factory=list)
    faults: list[int | None] = field(default_factory=list)  # None: answer that one normally
    drop_messages: int = 0
    stale_seqno_reads: int = 0  # answer this many seqno reads one behind (a lagging node)
    requests: int = 0
    _by_msg: dict[str, dict[str, Any]] = field(default_factory=dict)
    _lt: itertools.count = field(default_factory=lambda: itertools.count(1_000_000, 1_000))

    # --------------------------------------------------------------- state

    def add_wallet(self, address: str, public_key: bytes, *, balance: int, subwallet_id: int):
        self.wallets[raw_address(address)] = LocalWallet(public_key, subwallet_id, 0, balance)

    def transactions_of(self, account: str) -> list[dict[str, Any]]:
        return self.accounts.setdefault(raw_address(account), [])

    def add_incoming(
        self,
        account: str,
        value: int,
        *,
        comment: str | None = None,
        body: Cell | None = None,
        source: str | None = "0:" + "AB" * 32,
        bounced: bool = False,
        aborted: bool = False,
    ) -> dict[str, Any]:
        """A transaction of ``account`` receiving a message (``source=None``: external)."""
        account = raw_address(account)
        if body is None and comment is not None:
            body = comment_cell(comment)
        body = body if body is not None else Cell.empty()
        lt = next(self._lt)
        now = int(self.clock())
        if source is None:
            message = (
                begin_cell()
                .store_uint(2, 2)
                .store_address(None)
                .store_address(Address(account))
                .store_coins(0)
                .store_bit(0)
                .store_bit(1)
                .store_ref(body)
                .end_cell()
            )
        else:
            message = (
                begin_cell()
                .store_uint(0, 1)  # int_msg_info$0
                .store_bit(1)  # ihr_disabled
                .store_bit(0)  # bounce
                .store_bit(1 if bounced else 0)
                .store_address(Address(source))
                .store_address(Address(account))
                .store_coins(value)
                .store_bit(0)  # no extra currencies
                .store_coins(0)
                .store_coins(0)
                .store_uint(lt - 1, 64)
                .store_uint(now, 32)
                .store_bit(0)  # no state init
                .store_bit(1)
                .store_ref(body)
                .end_cell()
            )
        in_msg = {
            "hash": _b64(message.hash),
            "hash_norm": _b64(message.hash),
            "source": raw_address(source) if source else None,
            "destination": account,
            "value": str(value) if source else None,
            "bounced": bounced,
            "opcode": None,
            "message_content": {"body": _b64(body.to_boc()), "decoded": None},
        }
        return self._add_tx(account, lt, now, in_msg, [], aborted)

    def _add_tx(
        self,
        account: str,
        lt: int,
        now: int,
        in_msg: dict[str, Any],
        out_msgs: list[dict[str, Any]],
        aborted: bool,
    ) -> dict[str, Any]:
        tx_hash = hashlib.sha256(f"{account}:{lt}:{in_msg['hash']}".encode()).digest()
        tx = {
            "account": account,
            "hash": _b64(tx_hash),
            "lt": str(lt),
            "now": now,
            "orig_status": "active",
            "end_status": "active",
            "description": {"aborted": aborted, "compute_ph": {"success": not aborted}},
            "in_msg": in_msg,
            "out_msgs": out_msgs,
        }
        self.transactions_of(account).append(tx)
        self._by_msg[_hash_key(in_msg["hash_norm"])] = tx
        return tx

    def accept_external(self, boc: str) -> dict[str, str]:
        """What the network does with an external message; raises ValueError if refused."""
        parsed = parse_external(boc)
        wallet = self.wallets.get(parsed.wallet)
        if wallet is None:
            raise ValueError("unknown wallet")
        if not parsed.verifies(wallet.public_key):
            raise ValueError("bad signature")
        if parsed.subwallet_id != wallet.subwallet_id:
            raise ValueError("wrong subwallet id")
        if parsed.valid_until < self.clock():
            raise ValueError("message expired")
        if parsed.seqno != wallet.seqno:
            raise ValueError(f"seqno {parsed.seqno} does not match the wallet's {wallet.seqno}")
        answer = {
            "message_hash": _b64(bytes.fromhex(parsed.msg_hash)),
            "message_hash_norm": _b64(bytes.fromhex(parsed.msg_hash)),
        }
        if self.drop_messages > 0:
            self.drop_messages -= 1
            return answer  # lost on its way: never executes
        wallet.seqno += 1
        lt = next(self._lt)
        now = int(self.clock())
        out_msgs = []
        for transfer in parsed.transfers:
            if transfer.amount > wallet.balance:
                continue  # mode 3: ignore errors, the action is skipped
            wallet.balance -= transfer.amount
            out_msgs.append(
                {
                    "source": parsed.wallet,
                    "destination": transfer.destination,
                    "value": str(transfer.amount),
                    "bounced": False,
                    "message_content": {"body": None, "decoded": {"comment": transfer.comment}},
                }
            )
        in_msg = {
            "hash": answer["message_hash"],
            "hash_norm": answer["message_hash_norm"],
            "source": None,
            "destination": parsed.wallet,
            "value": None,
            "bounced": False,
            "message_content": {"body": None, "decoded": None},
        }
        self._add_tx(parsed.wallet, lt, now, in_msg, out_msgs, False)
        self.executed.append(parsed)
        return answer

    # ------------------------------------------------------------- the app

    def create_app(self) -> web.Application:
        app = web.Application(middlewares=[self._faults_middleware])
        app.router.add_get("/api/v3/transactions", self._transactions)
        app.router.add_get("/api/v3/transactionsByMessage", self._by_message)
        app.router.add_get("/api/v3/walletInformation", self._wallet_information)
        app.router.add_post("/api/v3/message", self._message)
        app.router.add_post("/localnet/deposit", self._deposit)
        return app

    @web.middleware
    async def _faults_middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests += 1
        if self.faults and request.path.startswith("/api/"):
            status = self.faults.pop(0)
            if status is not None:
                return web.json_response({"ok": False, "error": "injected fault"}, status=status)
        return await handler(request)

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
        txs = [
            tx
            for tx in self.accounts.get(account, [])
            if int(tx["lt"]) >= start_lt and (end_lt is None or int(tx["lt"]) <= end_lt)
        ]
        txs.sort(key=lambda tx: int(tx["lt"]), reverse=query.get("sort") == "desc")
        return web.json_response({"transactions": txs[offset : offset + limit], "address_book": {}})

    async def _by_message(self, request: web.Request) -> web.Response:
        try:
            key = _hash_key(request.query["msg_hash"])
        except (KeyError, ValueError):
            return web.json_response({"error": "bad msg_hash"}, status=422)
        tx = self._by_msg.get(key)
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
            )
        except (ValueError, KeyError, TypeError) as error:
            return web.json_response(
                {"error": f"send JSON {{account, value, comment?, source?}}: {error}"}, status=422
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
        self._runner = web.AppRunner(self.net.create_app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server
        assert server is not None
        port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"http://{self.host}:{port}"

    async def __aexit__(self, *_exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
