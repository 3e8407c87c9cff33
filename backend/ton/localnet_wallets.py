"""Hot wallets on the local TON Center (:mod:`backend.ton.localnet`): external messages run as
the wallet contracts run them.

- wallet v4r2: signature, subwallet, valid_until and seqno checked; seqno bumped; transfers paid
  while the balance lasts (mode 3, ignoring errors);
- Highload Wallet v3: signature, subwallet, timeout and ``created_at`` checked, the query id
  looked up in the two query dictionaries (replay refused) and set, the dictionaries cleaned
  after ``timeout``; after the commit a message with a state init or a source is dropped (the
  query id stays used), else sent with +2 (ignore errors); an ``internal_transfer`` to itself
  runs its action list in a second transaction (up to 255 actions), each transfer paid while
  the balance lasts; ``processed?`` answers as the get-method.
"""

from __future__ import annotations

import base64
from typing import Any

from ton_core import Cell

from backend.ton.comment import raw_address
from backend.ton.localnet_chain import b64, compute_phase, out_msg
from backend.ton.localnet_jettons import LocalJettons
from backend.ton.wallet import (
    INTERNAL_TRANSFER,
    ParsedHighload,
    WalletError,
    parse_external,
    parse_highload,
)


class LocalWallets(LocalJettons):
    """The chain with v4r2 and Highload Wallet v3 hot wallets."""

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
        answer = _hashes(boc, parsed.msg_hash)
        if self._lost():
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
        self._add_external_tx(parsed.wallet, answer, out_msgs, lt, now, "active")
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
        answer = _hashes(boc, parsed.msg_hash)
        if self._lost():
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
                out = out_msg(parsed.wallet, destination, value, body, lt, now)
                out_msgs.append(out)
                if destination == parsed.wallet:
                    follow = (out["hash"], value, body)
                else:
                    self._keep(destination, value)
        self._add_external_tx(parsed.wallet, answer, out_msgs, lt, now, status)
        self.executed_highload.append(parsed)
        if follow is not None:
            self._highload_internal(parsed.wallet, *follow)
        return answer

    def _lost(self) -> bool:
        """Whether the next message accepted is lost on its way (``drop_messages`` say how
        many more are)."""
        if self.drop_messages > 0:
            self.drop_messages -= 1
            return True
        return False

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
            out_msgs.append(out_msg(wallet, destination, amount, out_body, lt, now))
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
            "message_content": {"body": b64(body.to_boc()), "decoded": None},
        }
        description = {
            "type": "ord",
            "aborted": not action["success"],
            "destroyed": False,
            "credit_first": True,
            "credit_ph": {"credit": str(value)},
            "compute_ph": compute_phase("active", False),
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


def _hashes(boc: str, msg_hash: str) -> dict[str, str]:
    """What TON Center answers for an accepted message: its hash and its normalized hash."""
    return {
        "message_hash": b64(Cell.one_from_boc(base64.b64decode(boc)).hash),
        "message_hash_norm": b64(bytes.fromhex(msg_hash)),
    }


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
