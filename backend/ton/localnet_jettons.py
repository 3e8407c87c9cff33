"""Jettons on the local TON Center (:mod:`backend.ton.localnet`): a master answers
``get_wallet_address`` and its wallets ``get_wallet_data`` through ``runGetMethod``; a transfer
moves the balance between the owners' jetton wallets and, with a forward amount, sends the
receiver's owner a ``transfer_notification`` from the receiver's jetton wallet."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from ton_core import Address, Cell, begin_cell

from backend.ton.comment import comment_cell, raw_address
from backend.ton.localnet_chain import LocalChain, b64


class LocalJettons(LocalChain):
    """The chain with jetton masters and jetton wallets."""

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
            code = b64(Cell.empty().to_boc())
            result = [
                {"type": "num", "value": hex(balance)},
                _address_item(owner),
                _address_item(master),
                {"type": "cell", "value": code},
            ]
            return {"gas_used": 3000, "exit_code": 0, "stack": result}
        return None


def _address_item(address: str) -> dict[str, str]:
    """An address on a get-method's result stack, as TON Center v3 writes it."""
    return {
        "type": "cell",
        "value": b64(begin_cell().store_address(Address(address)).end_cell().to_boc()),
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
