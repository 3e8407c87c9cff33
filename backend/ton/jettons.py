"""USDT (a jetton) on the deposit wallet: which jetton wallet may credit, at what rate, and the
jetton transfer a TON Connect wallet signs to top up.

A jetton ``transfer_notification`` is a message anyone can send with any body: it is worth
something only when its sender is the deposit wallet's own jetton wallet *of the USDT master*,
the address the master's ``get_wallet_address`` gives for the deposit wallet. That address
never changes, so :class:`UsdtWallet` asks TON Center once and remembers it. Any other sender
(a fake jetton wallet, the wallet of a look-alike jetton, of the jetton named GRAM, which is
not the native coin) is refused; what the sender *claims* to be (its ``get_wallet_data``
master) is kept for the operator.

USDT is credited into the ledger as nanoTON at the operator's rate ``nano_per_micro``
(nanoTON per USDT micro-unit, 10^-6 USDT): ``credited = units × nano_per_micro``, an integer
product, so nothing is rounded and there is no remainder to keep.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ton_core import Address, begin_cell

from backend.settings import MAX_NANO
from backend.ton.comment import (
    cell_to_b64,
    comment_cell,
    friendly_address,
    raw_address,
    send_transaction,
)
from backend.ton.toncenter import TonCenter

__all__ = [
    "JETTON_TRANSFER",
    "MAX_USDT_UNITS",
    "TOPUP_FORWARD_NANO",
    "TOPUP_GAS_NANO",
    "USDT_DECIMALS",
    "UsdtWallet",
    "format_usdt",
    "jetton_topup_transaction",
    "usdt_credit",
]

JETTON_TRANSFER = 0x0F8A7EA5
USDT_DECIMALS = 6
TOPUP_GAS_NANO = 50_000_000  # TON sent with the transfer for the jetton wallets' fees
TOPUP_FORWARD_NANO = 1  # TON forwarded with the notification: it must be > 0 to be sent
MAX_USDT_UNITS = 10**12  # the most one Mini App top-up asks for: 1,000,000 USDT


def format_usdt(units: int) -> str:
    """Micro-units as decimal USDT, exactly, without trailing zeros: 12340000 → ``12.34``."""
    whole, part = divmod(units, 10**USDT_DECIMALS)
    fraction = f"{part:06d}".rstrip("0")
    return f"{whole}.{fraction}" if fraction else str(whole)


def usdt_credit(units: int, nano_per_micro: int) -> int | None:
    """The nanoTON that ``units`` USDT micro-units credit at the rate: their exact product;
    None when it is zero or more than the ledger holds."""
    credited = units * nano_per_micro
    return credited if 0 < credited <= MAX_NANO else None


@dataclass
class UsdtWallet:
    """The deposit wallet's jetton wallet of the USDT master, asked of TON Center once."""

    api: TonCenter
    master: str
    owner: str
    _address: str | None = None

    async def address(self) -> str | None:
        """Raw address, or None while the master has no code (then nothing is USDT).
        Raises TonCenterError (the caller retries later)."""
        if self._address is None:
            found = await self.api.jetton_wallet_address(self.master, self.owner)
            if found is None:
                return None
            self._address = found
        return self._address

    async def refusal(self, sender: str) -> tuple[str, str | None] | None:
        """None when ``sender`` is the USDT wallet; else why it is refused and the jetton
        master the sender claims (None when it claims none)."""
        ours = await self.address()
        if ours is None:
            return "the USDT master has no code on this network", None
        if raw_address(sender) == ours:
            return None
        try:
            claimed = await self.api.jetton_wallet_master(sender)
        except Exception:  # only a label for the operator: never a reason to retry
            claimed = None
        if claimed is not None and claimed == raw_address(self.master):
            return "a jetton wallet of USDT that is not the deposit wallet's", claimed
        if claimed is not None:
            return "not USDT: a jetton wallet of another master", claimed
        return "not a jetton wallet of USDT (fake or unknown sender)", None


def jetton_transfer_body(units: int, destination: str, response: str, memo: str) -> str:
    """``transfer#0f8a7ea5 query_id amount destination response_destination custom_payload
    forward_ton_amount forward_payload``: ``units`` to ``destination``, the memo as the
    forward payload's text comment, excess TON back to ``response``."""
    body = (
        begin_cell()
        .store_uint(JETTON_TRANSFER, 32)
        .store_uint(int(time.time() * 1000) % 2**64, 64)
        .store_coins(units)
        .store_address(Address(destination))
        .store_address(Address(response))
        .store_bit(0)  # no custom payload
        .store_coins(TOPUP_FORWARD_NANO)
        .store_bit(1)
        .store_ref(comment_cell(memo))
        .end_cell()
    )
    return cell_to_b64(body)


def jetton_topup_transaction(
    user_jetton_wallet: str,
    user_wallet: str,
    deposit_address: str,
    memo: str,
    units: int,
    *,
    ttl_s: int = 300,
    testnet: bool = False,
    now: float | None = None,
) -> dict[str, object]:
    """The ``sendTransaction`` request a TON Connect wallet signs to send ``units`` USDT
    micro-units to the deposit wallet with the user's memo: one message to the user's own
    USDT jetton wallet, carrying the jetton transfer."""
    message = {
        "address": friendly_address(user_jetton_wallet, bounceable=True, testnet=testnet),
        "amount": str(TOPUP_GAS_NANO),
        "payload": jetton_transfer_body(units, deposit_address, user_wallet, memo),
    }
    return send_transaction([message], ttl_s=ttl_s, testnet=testnet, now=now)
