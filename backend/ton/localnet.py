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
from aiohttp.typedefs import Handler
from ton_core import Address, Cell, begin_cell

from backend.ton.comment import comment_cell, raw_address
from backend.ton.wallet import (
    INTERNAL_TRANSFER,
    ParsedExternal,
    ParsedHighload,
    WalletError,
    parse_external,
    parse_highload,
)

BOUNCE_FEE = 266_669  # what a bounce costs the bounced value here (forwarding fees)


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
class LocalHighload:
    """A Highload Wallet v3's data: the two query dictionaries (shift → bits set)."""

    public_key: bytes
    subwallet_id: int
    timeout: int
    queries: dict[int, set[int]] = field(default_factory=dict)
    old_queries: dict[int, set[int]] = field(default_factory=dict)
    last_clean_time: int = 0


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

    # -------------------------------------------------------------- jettons

    def add_jetton(self, master: str) -> str:
        """A jetton master with code (it answers ``get_wallet_address``); its raw address."""
        self.jetton_masters.add(raw_address(master))
        self.statuses[raw_address(master)] = "active"
        return raw_address(master)

    def jetton_wallet(self, master: str, owner: str) -> str:
        """The jetton wallet ``master`` gives ``owner`` (a fixed address, as on chain)."""
        master, owner = raw_address(master), raw_address(owner)
        digest = hashlib.sha256(f"jetton-wallet:{master}:{owner}".encode()).hexdigest()
        wallet = raw_address(f"0:{digest}")
        self.jetton_wallets.setdefault(wallet, (master, owner))
        return wallet

    def mint_jetton(self, master: str, owner: str, units: int) -> None:
        wallet = self.jetton_wallet(master, owner)
        self.jetton_balances[wallet] = self.jetton_balances.get(wallet, 0) + units
        self.statuses[wallet] = "active"

    def transfer_jetton(
        self,
        master: str,
        sender: str,
        receiver: str,
        units: int,
        *,
        comment: str | None = None,
        forward_ton: int = 1,
        query_id: int = 0,
    ) -> dict[str, Any] | None:
        """What the jetton wallets do with ``transfer``: ``units`` from the sender's jetton
        wallet to the receiver's, then (``forward_ton`` > 0) a ``transfer_notification`` to
        the receiver from its jetton wallet, whose transaction is returned. ValueError when
        the sender's wallet holds less (the contract throws, nothing moves)."""
        source = self.jetton_wallet(master, sender)
        if not 0 < units <= self.jetton_balances.get(source, 0):
            raise ValueError("not enough jettons")
        target = self.jetton_wallet(master, receiver)
        self.jetton_balances[source] -= units
        self.jetton_balances[target] = self.jetton_balances.get(target, 0) + units
        self.statuses[target] = "active"
        if forward_ton <= 0:
            return None
        return self.add_incoming(
            receiver,
            forward_ton,
            body=jetton_notification(units, sender, comment, query_id=query_id),
            source=target,
        )

    def _jetton_get_method(self, address: str, method: str, stack: object) -> dict[str, Any] | None:
        """A jetton master's ``get_wallet_address`` or a jetton wallet's ``get_wallet_data``;
        None for any other account."""
        if address in self.jetton_masters:
            if method != "get_wallet_address":
                return {"gas_used": 0, "exit_code": 11, "stack": []}
            try:
                item = stack[0] if isinstance(stack, list) else {}
                cell = Cell.one_from_boc(base64.b64decode(item["value"]))
                asked = cell.begin_parse().load_address()
                assert item["type"] in ("slice", "cell") and isinstance(asked, Address)
            except Exception:  # the contract fails on a stack that is not one address
                return {"gas_used": 500, "exit_code": 7, "stack": []}
            wallet = self.jetton_wallet(address, raw_address(asked))
            return {"gas_used": 5000, "exit_code": 0, "stack": [_address_item(wallet)]}
        if address in self.jetton_wallets:
            if method != "get_wallet_data":
                return {"gas_used": 0, "exit_code": 11, "stack": []}
            master, owner = self.jetton_wallets[address]
            balance = self.jetton_balances.get(address, 0)
            code = _b64(Cell.empty().to_boc())
            result = [
                {"type": "num", "value": hex(balance)},
                _address_item(owner),
                _address_item(master),
                {"type": "cell", "value": code},
            ]
            return {"gas_used": 3000, "exit_code": 0, "stack": result}
        return None

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
            "hash": _b64(message.hash),
            "hash_norm": _b64(message.hash),
            "source": raw_address(source) if source else None,
            "destination": account,
            "value": str(value) if source else None,
            "bounce": bounce if source else None,
            "bounced": bounced if source else None,
            "opcode": opcode,
            "message_content": {"body": _b64(body.to_boc()), "decoded": None},
        }
        orig_status = self.status_of(account)
        out_msgs: list[dict[str, Any]] = []
        description: dict[str, Any] = {"type": "ord", "destroyed": False}
        if source is None:
            description.update(aborted=aborted, credit_first=False)
            description["compute_ph"] = _computed(orig_status, aborted)
        else:
            deployed = orig_status == "active"
            failed = aborted or not deployed
            description.update(aborted=failed, credit_first=not bounce)
            description["credit_ph"] = {"credit": str(value)}
            description["compute_ph"] = _computed(orig_status, aborted)
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
                            "hash": _b64(hashlib.sha256(message.hash + b"bounce").digest()),
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
            "hash": _b64(tx_hash),
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
        self._by_raw[_hash_key(in_msg["hash"])] = tx
        self._by_norm[_hash_key(in_msg["hash_norm"])] = tx
        return tx

    def accept_external(self, boc: str) -> dict[str, str]:
        """What the network does with an external message; raises ValueError if refused."""
        if self.highload:
            try:
                highload = parse_highload(boc)
            except WalletError:
                highload = None
            if highload is not None and highload.wallet in self.highload:
                return self._accept_highload(boc, highload)
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
            "message_hash": _b64(Cell.one_from_boc(base64.b64decode(boc)).hash),
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
        description = {
            "type": "ord",
            "aborted": False,
            "destroyed": False,
            "credit_first": False,
            "compute_ph": _computed("active", False),
            "action": {"success": True, "valid": True, "result_code": 0},
        }
        self._add_tx(parsed.wallet, lt, now, in_msg, out_msgs, description, "active")
        self.executed.append(parsed)
        return answer

    # ----------------------------------------------------- Highload Wallet v3

    def _accept_highload(self, boc: str, parsed: ParsedHighload) -> dict[str, str]:
        """recv_external of the contract: refused (ValueError, nothing changes) before its
        accept; after it the query id is used whatever the message to send turns out to be."""
        wallet = self.highload[parsed.wallet]
        now = int(self.clock())
        status = self.status_of(parsed.wallet)
        if status != "active":
            init = parsed.state_init
            if init is None or raw_address(f"0:{init.serialize().hash.hex()}") != parsed.wallet:
                raise ValueError("the wallet is not deployed and the message has no state init")
        queries, old_queries = wallet.queries, wallet.old_queries
        last_clean = wallet.last_clean_time
        if last_clean < now - wallet.timeout:
            queries, old_queries = {}, queries
            if last_clean < now - 2 * wallet.timeout:
                old_queries = {}
            last_clean = now
        if not parsed.verifies(wallet.public_key):
            raise ValueError("exit code 33: bad signature")
        if parsed.subwallet_id != wallet.subwallet_id:
            raise ValueError("exit code 34: wrong subwallet id")
        if parsed.timeout != wallet.timeout:
            raise ValueError("exit code 38: wrong timeout")
        if not now - wallet.timeout < parsed.created_at <= now:
            raise ValueError("exit code 35: created_at out of the window")
        shift, bit = parsed.shift, parsed.bit_number
        if bit >= 1023:
            raise ValueError("exit code 9: bit number past the bitmap")
        if bit in old_queries.get(shift, set()) or bit in queries.get(shift, set()):
            raise ValueError("exit code 36: already executed")
        answer = {
            "message_hash": _b64(Cell.one_from_boc(base64.b64decode(boc)).hash),
            "message_hash_norm": _b64(bytes.fromhex(parsed.msg_hash)),
        }
        if self.drop_messages > 0:
            self.drop_messages -= 1
            return answer  # lost on its way: never executes
        # accept_message(); the data is set and committed
        self.statuses[parsed.wallet] = "active"
        queries = {k: set(v) for k, v in queries.items()}
        queries.setdefault(shift, set()).add(bit)
        wallet.queries, wallet.old_queries = queries, old_queries
        wallet.last_clean_time = last_clean
        lt = next(self._lt)
        out_msgs: list[dict[str, Any]] = []
        internal = _readable_internal(parsed.message_to_send)
        follow: tuple[str, int, Cell] | None = None
        if internal is not None:
            destination, value, body = internal
            if value <= self.balances.get(parsed.wallet, 0):  # +2: skipped when it cannot pay
                self.balances[parsed.wallet] -= value
                out = _out_msg(parsed.wallet, destination, value, body, lt, now)
                out_msgs.append(out)
                if destination == parsed.wallet:
                    follow = (out["hash"], value, body)
                else:
                    self._keep(destination, value)
        in_msg = {
            "hash": answer["message_hash"],
            "hash_norm": answer["message_hash_norm"],
            "source": None,
            "destination": parsed.wallet,
            "value": None,
            "bounced": False,
            "message_content": {"body": None, "decoded": None},
        }
        description = {
            "type": "ord",
            "aborted": False,
            "destroyed": False,
            "credit_first": False,
            "compute_ph": _computed("active", False),
            "action": {"success": True, "valid": True, "result_code": 0},
        }
        self._add_tx(parsed.wallet, lt, now, in_msg, out_msgs, description, status)
        self.executed_highload.append(parsed)
        if follow is not None:
            self._highload_internal(parsed.wallet, *follow)
        return answer

    def _highload_internal(self, wallet: str, msg_hash: str, value: int, body: Cell) -> None:
        """recv_internal of the wallet for a message from itself: ``internal_transfer`` sets
        its action list (run in this transaction), anything else is a plain top-up."""
        self.balances[wallet] = self.balances.get(wallet, 0) + value
        lt = next(self._lt)
        now = int(self.clock())
        actions = _internal_transfer_actions(body)
        out_msgs: list[dict[str, Any]] = []
        action: dict[str, Any] = {"success": True, "valid": True, "result_code": 0}
        if actions is not None and len(actions) > 255:
            action = {"success": False, "valid": False, "result_code": 33}  # too many actions
            actions = []
        for mode, cell in actions or []:
            internal = _readable_internal(cell)
            if internal is None:
                continue
            destination, amount, out_body = internal
            if amount > self.balances[wallet]:
                if mode & 2:
                    continue  # this one is skipped, the others go
                action = {"success": False, "valid": True, "result_code": 37}
                out_msgs = []
                break
            self.balances[wallet] -= amount
            out_msgs.append(_out_msg(wallet, destination, amount, out_body, lt, now))
        if not action["success"]:  # a failed action phase sends nothing: undo what it took
            self.balances[wallet] += sum(int(m["value"]) for m in out_msgs)
            out_msgs = []
        for out in out_msgs:
            if out["destination"] != wallet:
                self._keep(out["destination"], int(out["value"]))
        in_msg = {
            "hash": msg_hash,
            "hash_norm": msg_hash,
            "source": wallet,
            "destination": wallet,
            "value": str(value),
            "bounced": False,
            "opcode": f"0x{INTERNAL_TRANSFER:08x}" if actions is not None else None,
            "message_content": {"body": _b64(body.to_boc()), "decoded": None},
        }
        description = {
            "type": "ord",
            "aborted": not action["success"],
            "destroyed": False,
            "credit_first": True,
            "credit_ph": {"credit": str(value)},
            "compute_ph": _computed("active", False),
            "action": action,
        }
        self._add_tx(wallet, lt, now, in_msg, out_msgs, description, "active")

    def _highload_get_method(self, address: str, method: str, stack: object) -> dict[str, Any]:
        wallet = self.highload[address]
        values = {
            "get_public_key": int.from_bytes(wallet.public_key, "big"),
            "get_subwallet_id": wallet.subwallet_id,
            "get_timeout": wallet.timeout,
            "get_last_clean_time": wallet.last_clean_time,
        }
        if method == "processed?":
            try:
                assert isinstance(stack, list) and len(stack) == 2
                query_id, need_clean = (int(str(item["value"]), 0) for item in stack)
            except Exception:  # the contract fails on a stack that is not two numbers
                return {"gas_used": 500, "exit_code": 7, "stack": []}
            now = int(self.clock())
            shift, bit = query_id >> 10, query_id & 1023
            queries, old_queries = wallet.queries, wallet.old_queries
            if need_clean and wallet.last_clean_time < now - wallet.timeout:
                queries, old_queries = {}, queries
                if wallet.last_clean_time < now - 2 * wallet.timeout:
                    old_queries = {}
            found = bit in old_queries.get(shift, set()) or bit in queries.get(shift, set())
            return {"gas_used": 3000, "exit_code": 0, "stack": [_num(-1 if found else 0)]}
        if method not in values:
            return {"gas_used": 0, "exit_code": 11, "stack": []}
        return {"gas_used": 1000, "exit_code": 0, "stack": [_num(values[method])]}

    # ------------------------------------------------------------- the app

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
            key = _hash_key(request.query["msg_hash"])
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


def _num(value: int) -> dict[str, str]:
    return {"type": "num", "value": hex(value)}


def _readable_internal(cell: Cell) -> tuple[str, int, Cell] | None:
    """(destination, value, body) of a message a highload wallet may send: an internal
    message without a source and without a state init (the contract drops anything else)."""
    from ton_core.tlb.transaction import InternalMsgInfo, MessageAny

    try:
        message = MessageAny.deserialize(cell.begin_parse())
    except Exception:
        return None
    info = message.info
    if not isinstance(info, InternalMsgInfo) or info.src is not None or message.init is not None:
        return None
    if info.bounced:
        return None
    return raw_address(info.dest), int(info.value.grams), message.body or Cell.empty()


def _internal_transfer_actions(body: Cell) -> list[tuple[int, Cell]] | None:
    """The send-message actions of an ``internal_transfer`` body (``op query_id ^OutList``),
    first to run first; None for any other body."""
    try:
        head = body.begin_parse()
        if len(body.bits) != 96 or len(body.refs) != 1 or head.load_uint(32) != INTERNAL_TRANSFER:
            return None
        actions: list[tuple[int, Cell]] = []
        node = body.refs[0].begin_parse()
        while node.remaining_refs:
            previous = node.load_ref()
            if node.load_uint(32) != 0x0EC3C86D:  # action_send_msg
                raise ValueError("not a send-message action")
            actions.append((node.load_uint(8), node.load_ref()))
            node = previous.begin_parse()
    except Exception:
        return []
    actions.reverse()
    return actions


def _out_msg(
    source: str, destination: str, value: int, body: Cell, lt: int, now: int
) -> dict[str, Any]:
    """An outgoing message as TON Center v3 shows it (with its hash, to be looked up)."""
    digest = hashlib.sha256(f"{source}:{destination}:{value}:{lt}:".encode() + body.hash)
    comment = None
    if body.bits and len(body.bits) >= 32 and body.begin_parse().load_uint(32) == 0:
        from backend.ton.comment import decode_comment

        comment = decode_comment(_b64(body.to_boc())).memo
    return {
        "hash": _b64(digest.digest()),
        "source": source,
        "destination": destination,
        "value": str(value),
        "bounced": False,
        "created_at": str(now),
        "message_content": {
            "body": _b64(body.to_boc()),
            "decoded": {"type": "text_comment", "comment": comment} if comment else None,
        },
    }


def _address_item(address: str) -> dict[str, str]:
    """An address on a get-method's result stack, as TON Center v3 writes it."""
    return {
        "type": "cell",
        "value": _b64(begin_cell().store_address(Address(address)).end_cell().to_boc()),
    }


def jetton_notification(
    units: int, sender: str | None, comment: str | None, *, query_id: int = 0
) -> Cell:
    """A ``transfer_notification`` body: the forward payload (a text comment) in a ref."""
    builder = (
        begin_cell()
        .store_uint(0x7362D09C, 32)
        .store_uint(query_id, 64)
        .store_coins(units)
        .store_address(Address(sender) if sender else None)
    )
    if comment is None:
        return builder.store_bit(0).end_cell()
    return builder.store_bit(1).store_ref(comment_cell(comment)).end_cell()


def _computed(status: str, fails: bool) -> dict[str, Any]:
    """The compute phase as TON Center v3 shows it now (``skipped`` and ``reason``)."""
    if status != "active":
        return {"skipped": True, "reason": "no_state"}
    return {"skipped": False, "success": not fails, "exit_code": 0 if not fails else 100}


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
        port = self._runner.addresses[0][1]  # the one site's (host, port, ...)
        return f"http://{self.host}:{port}"

    async def __aexit__(self, *_exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
