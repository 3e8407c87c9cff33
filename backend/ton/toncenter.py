"""A small TON Center HTTP client: the endpoints Cocoon uses, typed errors, no retries.

Callers decide how to retry (the watcher and the payout sender back off; a payout resends the
same BOC). Base URL and API key come from :class:`~backend.settings.TonSettings`.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import aiohttp
from ton_core import Address, Cell, begin_cell

from backend.settings import TonSettings
from backend.ton.comment import raw_address

TIMEOUT_S = 20


class TonCenterError(Exception):
    """TON Center did not answer as hoped. ``transient``: worth trying again later."""

    def __init__(self, message: str, *, status: int | None = None, transient: bool = True):
        super().__init__(message)
        self.status = status
        self.transient = transient


class TonCenter:
    """``async with TonCenter(base_url, api_key) as api: await api.transactions(...)``."""

    def __init__(self, base_url: str, api_key: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"X-API-Key": api_key} if api_key else {}
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_settings(cls, settings: TonSettings) -> TonCenter:
        key = settings.api_key.get_secret_value() if settings.api_key else None
        return cls(settings.base_url, key)

    async def __aenter__(self) -> TonCenter:
        self._session = aiohttp.ClientSession(
            headers=self._headers, timeout=aiohttp.ClientTimeout(total=TIMEOUT_S)
        )
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _call(
        self, method: str, path: str, *, params: dict[str, Any] | None = None, json: Any = None
    ) -> Any:
        if self._session is None:
            raise RuntimeError("use TonCenter inside `async with`")
        url = f"{self.base_url}{path}"
        try:
            async with self._session.request(method, url, params=params, json=json) as response:
                if response.status == 429 or response.status >= 500:
                    raise TonCenterError(
                        f"TON Center {path}: HTTP {response.status}", status=response.status
                    )
                try:
                    body = await response.json(content_type=None)
                except ValueError:
                    raise TonCenterError(f"TON Center {path}: not JSON") from None
                if response.status >= 400:
                    detail = body.get("error") if isinstance(body, dict) else None
                    raise TonCenterError(
                        f"TON Center {path}: HTTP {response.status} {detail or ''}".strip(),
                        status=response.status,
                        transient=False,
                    )
                return body
        except (aiohttp.ClientError, TimeoutError) as error:
            raise TonCenterError(f"TON Center {path}: {type(error).__name__}") from error

    async def transactions(
        self,
        account: str,
        *,
        start_lt: int,
        limit: int,
        offset: int = 0,
        end_lt: int | None = None,
        newest_first: bool = False,
    ) -> list[dict[str, Any]]:
        """The account's transactions with ``start_lt <= lt`` (and ``lt <= end_lt``: both
        bounds are inclusive), oldest first, or newest first with ``newest_first``."""
        params: dict[str, Any] = {
            "account": account,
            "start_lt": start_lt,
            "limit": limit,
            "offset": offset,
            "sort": "desc" if newest_first else "asc",
        }
        if end_lt is not None:
            params["end_lt"] = end_lt
        body = await self._call("GET", "/api/v3/transactions", params=params)
        return _transactions(body, "/api/v3/transactions")

    async def transactions_by_message(self, msg_hash: str) -> list[dict[str, Any]]:
        """Transactions whose incoming message has this hash (TON Center matches the raw
        and the normalized hash of an external message; other indexers may match only one)."""
        body = await self._call(
            "GET",
            "/api/v3/transactionsByMessage",
            params={"msg_hash": msg_hash, "direction": "in"},
        )
        return _transactions(body, "/api/v3/transactionsByMessage")

    async def wallet_seqno(self, address: str) -> int:
        """The wallet's seqno on chain (0 for a wallet not deployed yet)."""
        body = await self._call(
            "GET", "/api/v3/walletInformation", params={"address": address, "use_v2": "false"}
        )
        seqno = body.get("seqno") if isinstance(body, dict) else None
        try:
            value = int(seqno or 0)
        except (TypeError, ValueError):
            value = -1
        if isinstance(seqno, bool) or not 0 <= value < 2**32:
            raise TonCenterError(f"TON Center /api/v3/walletInformation: bad seqno {seqno!r:.40}")
        return value

    async def send_message(self, boc: str) -> None:
        """Hand an external message (base64 BOC) to the network. Whether it landed is told by
        the wallet's seqno, not by this answer."""
        await self._call("POST", "/api/v3/message", json={"boc": boc})

    async def run_get_method(
        self, address: str, method: str, stack: list[dict[str, Any]] | None = None
    ) -> GetMethodResult:
        """Run a get-method of the account now (``POST /api/v3/runGetMethod``).

        TON Center answers ``{gas_used, exit_code, stack: [{type, value}]}``; a contract that
        is not deployed (no code) answers exit code -13. The exit code is returned, not raised.
        """
        path = "/api/v3/runGetMethod"
        body = await self._call(
            "POST", path, json={"address": address, "method": method, "stack": stack or []}
        )
        exit_code = body.get("exit_code") if isinstance(body, dict) else None
        items = body.get("stack") if isinstance(body, dict) else None
        if isinstance(exit_code, bool) or not isinstance(exit_code, int):
            raise TonCenterError(f"TON Center {path}: malformed reply (no exit code)")
        if items is None:
            items = []
        if not isinstance(items, list) or len(items) > MAX_STACK:
            raise TonCenterError(f"TON Center {path}: malformed reply (no stack)")
        return GetMethodResult(
            exit_code, [item if isinstance(item, dict) else {} for item in items]
        )

    async def wallet_public_key(self, address: str) -> bytes | None:
        """The key a wallet's ``get_public_key`` returns now, or None when the account has no
        code (not deployed yet). Raises TonCenterError (``transient=False`` when the contract
        answers but has no such key, e.g. wallet v3r1 has no ``get_public_key``)."""
        result = await self.run_get_method(address, "get_public_key")
        if result.exit_code == EXIT_NO_CODE:
            return None
        if result.exit_code != 0:
            raise TonCenterError(
                f"get_public_key failed with exit code {result.exit_code}", transient=False
            )
        value = result.number(0)
        if value is None or not 0 < value < 2**256:
            raise TonCenterError("get_public_key returned no 256-bit key", transient=False)
        return value.to_bytes(32, "big")

    async def jetton_wallet_address(self, master: str, owner: str) -> str | None:
        """The jetton wallet that the jetton ``master`` gives ``owner`` (its
        ``get_wallet_address``), raw; None when the master has no code. Raises
        TonCenterError (``transient=False`` when the master answers with no address)."""
        owner_cell = begin_cell().store_address(Address(owner)).end_cell()
        stack = [{"type": "slice", "value": base64.b64encode(owner_cell.to_boc()).decode()}]
        result = await self.run_get_method(master, "get_wallet_address", stack)
        if result.exit_code == EXIT_NO_CODE:
            return None
        address = result.address(0) if result.exit_code == 0 else None
        if address is None:
            raise TonCenterError(
                f"get_wallet_address failed (exit code {result.exit_code})", transient=False
            )
        return address

    async def jetton_wallet_master(self, wallet: str) -> str | None:
        """The master a jetton wallet names in its ``get_wallet_data`` (balance, owner,
        master, code), raw; None when the account answers no such thing (no code, not a
        jetton wallet). Only the master's own ``get_wallet_address`` proves the wallet is
        its: this is what the wallet *claims*, for telling an operator which jetton came."""
        result = await self.run_get_method(wallet, "get_wallet_data")
        return result.address(2) if result.exit_code == 0 else None


EXIT_NO_CODE = -13  # a get-method run on an account without code (uninit or nonexist)
MAX_STACK = 256


@dataclass(frozen=True)
class GetMethodResult:
    """A get-method's answer: its exit code and its result stack as TON Center gives it."""

    exit_code: int
    stack: list[dict[str, Any]]

    def number(self, index: int) -> int | None:
        """The ``num`` entry at ``index`` (TON Center writes it in hex, ``"0x…"`` or
        ``"-0x…"``), or None when there is no such number."""
        if not 0 <= index < len(self.stack):
            return None
        item = self.stack[index]
        value = item.get("value")
        if item.get("type") != "num" or not isinstance(value, str) or len(value) > 100:
            return None
        try:
            return int(value, 16) if value.lstrip("-").startswith("0x") else int(value)
        except ValueError:
            return None

    def address(self, index: int) -> str | None:
        """The address in the ``cell`` or ``slice`` entry at ``index`` (a base64 BOC), raw,
        or None when there is none (or it is not an internal address)."""
        if not 0 <= index < len(self.stack):
            return None
        item = self.stack[index]
        value = item.get("value")
        if item.get("type") not in ("cell", "slice") or not isinstance(value, str):
            return None
        if len(value) > MAX_CELL_B64:
            return None
        try:
            address = Cell.one_from_boc(base64.b64decode(value)).begin_parse().load_address()
        except Exception:  # any malformed BOC or slice: not an address
            return None
        return raw_address(address) if isinstance(address, Address) else None


MAX_CELL_B64 = 4096  # an address cell is under 100 bytes of BOC


def _transactions(body: Any, path: str) -> list[dict[str, Any]]:
    """The ``transactions`` of a reply, each with a usable ``lt`` and ``hash``; a reply of any
    other shape is a (transient) TonCenterError, never a crash of the caller."""
    items = body.get("transactions") if isinstance(body, dict) else None
    if items is None and isinstance(body, dict):
        items = []
    if not isinstance(items, list):
        raise TonCenterError(f"TON Center {path}: malformed reply (no transaction list)")
    for tx in items:
        if not isinstance(tx, dict):
            raise TonCenterError(f"TON Center {path}: malformed transaction")
        lt, tx_hash = tx.get("lt"), tx.get("hash")
        try:
            valid = lt is not None and not isinstance(lt, bool) and 0 < int(lt) < 2**64
        except (TypeError, ValueError):
            valid = False
        if not valid or not isinstance(tx_hash, str):
            raise TonCenterError(f"TON Center {path}: transaction without a valid lt and hash")
    return items
