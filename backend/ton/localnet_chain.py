"""The local TON Center's chain (:mod:`backend.ton.localnet`): accounts, their transactions and
balances in memory, incoming messages executed as on chain, transactions shown as TON Center v3
shows them.

An account that was never deployed (``nonexist``, then ``uninit``) aborts every incoming
transaction (compute skipped, ``no_state``) and keeps a non-bounceable value, while a bounceable
one bounces back to its sender (bounce phase ``ok``, the value less the bounce fee); wallets and
``deploy``-ed accounts are ``active``. A transaction can be served only later (``indexed=False``,
then ``index``), as the real indexer commits in parallel.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ton_core import Address, Cell, begin_cell

from backend.ton.comment import comment_cell, raw_address
from backend.ton.wallet import ParsedExternal, ParsedHighload

BOUNCE_FEE = 266_669  # what a bounce costs the bounced value here (forwarding fees)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def hash_key(text: str) -> str:
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
class LocalHighload:
    """A Highload Wallet v3's data: the two query dictionaries (shift → bits set)."""

    public_key: bytes
    subwallet_id: int
    timeout: int
    queries: dict[int, set[int]] = field(default_factory=dict)
    old_queries: dict[int, set[int]] = field(default_factory=dict)
    last_clean_time: int = 0


@dataclass
class LocalChain:
    """The chain's state; :class:`backend.ton.localnet.LocalTonCenter` serves it."""

    clock: Callable[[], float] = time.time
    accounts: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    wallets: dict[str, LocalWallet] = field(default_factory=dict)
    received: list[str] = field(default_factory=list)
    executed: list[ParsedExternal] = field(default_factory=list)
    faults: list[int | None] = field(default_factory=list)  # None: answer that one normally
    drop_messages: int = 0
    stale_seqno_reads: int = 0  # answer this many seqno reads one behind (a lagging node)
    requests: int = 0
    statuses: dict[str, str] = field(default_factory=dict)  # absent: nonexist
    balances: dict[str, int] = field(default_factory=dict)  # of accounts that are not wallets
    unindexed: set[str] = field(default_factory=set)  # hashes of transactions not served yet
    jetton_wallets: dict[str, tuple[str, str]] = field(default_factory=dict)  # → master, owner
    jetton_balances: dict[str, int] = field(default_factory=dict)
    jetton_masters: set[str] = field(default_factory=set)
    highload: dict[str, LocalHighload] = field(default_factory=dict)
    executed_highload: list[ParsedHighload] = field(default_factory=list)
    match_raw_hashes: bool = True
    match_normalized_hashes: bool = True
    _by_raw: dict[str, dict[str, Any]] = field(default_factory=dict)
    _by_norm: dict[str, dict[str, Any]] = field(default_factory=dict)
    _lt: itertools.count[int] = field(default_factory=lambda: itertools.count(1_000_000, 1_000))

    # --------------------------------------------------------------- state

    def add_wallet(
        self, address: str, public_key: bytes, *, balance: int, subwallet_id: int
    ) -> None:
        self.wallets[raw_address(address)] = LocalWallet(public_key, subwallet_id, 0, balance)

    def add_highload_wallet(
        self,
        address: str,
        public_key: bytes,
        *,
        balance: int,
        subwallet_id: int,
        timeout: int,
        deployed: bool = True,
    ) -> None:
        """A Highload Wallet v3 holding ``balance``; not ``deployed``: its first external
        message must carry the state init."""
        account = raw_address(address)
        self.highload[account] = LocalHighload(public_key, subwallet_id, timeout)
        self.balances[account] = balance
        self.statuses[account] = "active" if deployed else "uninit"

    def transactions_of(self, account: str) -> list[dict[str, Any]]:
        return self.accounts.setdefault(raw_address(account), [])

    def deploy(self, account: str) -> None:
        """Give ``account`` code: from now on it runs incoming messages (and accepts them)."""
        self.statuses[raw_address(account)] = "active"

    def status_of(self, account: str) -> str:
        account = raw_address(account)
        return "active" if account in self.wallets else self.statuses.get(account, "nonexist")

    def balance_of(self, account: str) -> int:
        account = raw_address(account)
        wallet = self.wallets.get(account)
        return wallet.balance if wallet is not None else self.balances.get(account, 0)

    def _keep(self, account: str, value: int) -> int:
        wallet = self.wallets.get(account)
        if wallet is not None:
            wallet.balance += value
            return wallet.balance
        self.balances[account] = self.balances.get(account, 0) + value
        if self.statuses.get(account, "nonexist") == "nonexist":
            self.statuses[account] = "uninit"
        return self.balances[account]

    def index(self, tx: dict[str, Any]) -> None:
        """Serve a transaction added with ``indexed=False`` from now on."""
        self.unindexed.discard(tx["hash"])

    def add_incoming(
        self,
        account: str,
        value: int,
        *,
        comment: str | None = None,
        body: Cell | None = None,
        source: str | None = "0:" + "AB" * 32,
        bounce: bool = False,
        bounced: bool = False,
        aborted: bool = False,
        indexed: bool = True,
    ) -> dict[str, Any]:
        """A transaction of ``account`` receiving a message (``source=None``: external).

        ``bounce``: the message is bounceable; ``bounced``: it is itself a bounce;
        ``aborted``: the code of an active account fails on it (an account that was never
        deployed aborts anyway). What happens to the value follows the chain's rules."""
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
                .store_bit(1 if bounce else 0)
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
        opcode = None
        if body.bits and len(body.bits) >= 32:
            opcode = f"0x{body.begin_parse().load_uint(32):08x}"
        in_msg = {
            "hash": b64(message.hash),
            "hash_norm": b64(message.hash),
            "source": raw_address(source) if source else None,
            "destination": account,
            "value": str(value) if source else None,
            "bounce": bounce if source else None,
            "bounced": bounced if source else None,
            "opcode": opcode,
            "message_content": {"body": b64(body.to_boc()), "decoded": None},
        }
        orig_status = self.status_of(account)
        out_msgs: list[dict[str, Any]] = []
        description: dict[str, Any] = {"type": "ord", "destroyed": False}
        if source is None:
            description.update(aborted=aborted, credit_first=False)
            description["compute_ph"] = compute_phase(orig_status, aborted)
        else:
            deployed = orig_status == "active"
            failed = aborted or not deployed
            description.update(aborted=failed, credit_first=not bounce)
            description["credit_ph"] = {"credit": str(value)}
            description["compute_ph"] = compute_phase(orig_status, aborted)
            if not failed:
                description["action"] = {"success": True, "valid": True, "result_code": 0}
            elif bounce and not bounced:  # bounced messages never bounce again
                if value > BOUNCE_FEE:
                    description["bounce"] = {
                        "type": "ok",
                        "msg_fees": "0",
                        "fwd_fees": str(BOUNCE_FEE),
                    }
                    out_msgs.append(
                        {
                            "hash": b64(hashlib.sha256(message.hash + b"bounce").digest()),
                            "source": account,
                            "destination": raw_address(source),
                            "value": str(value - BOUNCE_FEE),
                            "bounce": False,
                            "bounced": True,
                            "opcode": "0xffffffff",
                            "message_content": {"body": None, "decoded": None},
                        }
                    )
                else:
                    description["bounce"] = {"type": "nofunds", "req_fwd_fees": str(BOUNCE_FEE)}
            if not out_msgs:
                self._keep(account, value)
        tx = self._add_tx(account, lt, now, in_msg, out_msgs, description, orig_status)
        if not indexed:
            self.unindexed.add(tx["hash"])
        return tx

    def _add_tx(
        self,
        account: str,
        lt: int,
        now: int,
        in_msg: dict[str, Any],
        out_msgs: list[dict[str, Any]],
        description: dict[str, Any],
        orig_status: str,
    ) -> dict[str, Any]:
        tx_hash = hashlib.sha256(f"{account}:{lt}:{in_msg['hash']}".encode()).digest()
        tx = {
            "account": account,
            "hash": b64(tx_hash),
            "lt": str(lt),
            "now": now,
            "orig_status": orig_status,
            "end_status": self.status_of(account),
            "description": description,
            "in_msg": in_msg,
            "out_msgs": out_msgs,
            "account_state_after": {
                "balance": str(self.balance_of(account)),
                "account_status": self.status_of(account),
            },
        }
        self.transactions_of(account).append(tx)
        self._by_raw[hash_key(in_msg["hash"])] = tx
        self._by_norm[hash_key(in_msg["hash_norm"])] = tx
        return tx

    def _add_external_tx(
        self,
        wallet: str,
        answer: dict[str, str],
        out_msgs: list[dict[str, Any]],
        lt: int,
        now: int,
        orig_status: str,
    ) -> dict[str, Any]:
        """The transaction of a wallet's accepted external message (v4r2 or highload): an
        ``ord`` transaction whose compute and action phases succeeded."""
        in_msg = {
            "hash": answer["message_hash"],
            "hash_norm": answer["message_hash_norm"],
            "source": None,
            "destination": wallet,
            "value": None,
            "bounced": False,
            "message_content": {"body": None, "decoded": None},
        }
        description = {
            "type": "ord",
            "aborted": False,
            "destroyed": False,
            "credit_first": False,
            "compute_ph": compute_phase("active", False),
            "action": {"success": True, "valid": True, "result_code": 0},
        }
        return self._add_tx(wallet, lt, now, in_msg, out_msgs, description, orig_status)


def out_msg(
    source: str, destination: str, value: int, body: Cell, lt: int, now: int
) -> dict[str, Any]:
    """An outgoing message as TON Center v3 shows it (with its hash, to be looked up)."""
    digest = hashlib.sha256(f"{source}:{destination}:{value}:{lt}:".encode() + body.hash)
    comment = None
    if body.bits and len(body.bits) >= 32 and body.begin_parse().load_uint(32) == 0:
        from backend.ton.comment import decode_comment

        comment = decode_comment(b64(body.to_boc())).memo
    return {
        "hash": b64(digest.digest()),
        "source": source,
        "destination": destination,
        "value": str(value),
        "bounced": False,
        "created_at": str(now),
        "message_content": {
            "body": b64(body.to_boc()),
            "decoded": {"type": "text_comment", "comment": comment} if comment else None,
        },
    }


def compute_phase(status: str, fails: bool) -> dict[str, Any]:
    """The compute phase as TON Center v3 shows it now (``skipped`` and ``reason``)."""
    if status != "active":
        return {"skipped": True, "reason": "no_state"}
    return {"skipped": False, "success": not fails, "exit_code": 0 if not fails else 100}
