"""Wallet contracts: which wallet a ``walletStateInit`` holds and the key it starts with.

The contract is recognised by its code hash among the maintained library's (``ton_core``):
wallet v3r1, v3r2, v4r1, v4r2, W5 beta, v5r1 and Telegram's own wallet (whose key can change
after deployment: its state init tells only the first key). The state init must hash to the
address it claims. ``ton_proof`` verification (:mod:`backend.ton.proof`) reads keys here.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ton_core import Cell, Slice, StateInit

from backend.ton.comment import AddressError, parse_address

__all__ = ["MAX_STATE_INIT", "StateInitError", "StateInitKey", "WalletLayout", "read_state_init"]

MAX_STATE_INIT = 20_000  # base64 characters; a wallet's state init is a few hundred


class StateInitError(ValueError):
    """A state init that tells no key: unreadable, not the address's, or no known wallet. The
    message says which (safe to show the user)."""


@dataclass(frozen=True)
class WalletLayout:
    """A wallet contract: its name, how its data holds the key, whether the key can change
    after deployment (then the state init tells only the first key)."""

    name: str
    read_key: Callable[[Slice, str], bytes]  # (data, TON Connect network) -> public key
    rotates: bool = False


def _wallet_layouts() -> dict[bytes, WalletLayout]:
    """Code hash → layout, from the library's contract codes and data schemes."""
    from ton_core import (
        CONTRACT_CODES,
        ContractVersion,
        NetworkGlobalID,
        WalletTgData,
        WalletV3Data,
        WalletV4Data,
        WalletV5BetaData,
        WalletV5Data,
    )

    def plain(scheme: Any) -> Callable[[Slice, str], bytes]:
        return lambda data, _network: scheme.deserialize(data).public_key.as_bytes

    def v5r1(data: Slice, network: str) -> bytes:  # its wallet_id is packed with the network
        return WalletV5Data.deserialize(data, NetworkGlobalID(int(network))).public_key.as_bytes

    layouts: dict[bytes, WalletLayout] = {}
    for version, layout in (
        (ContractVersion.WalletV3R1, WalletLayout("wallet v3r1", plain(WalletV3Data))),
        (ContractVersion.WalletV3R2, WalletLayout("wallet v3r2", plain(WalletV3Data))),
        (ContractVersion.WalletV4R1, WalletLayout("wallet v4r1", plain(WalletV4Data))),
        (ContractVersion.WalletV4R2, WalletLayout("wallet v4r2", plain(WalletV4Data))),
        (ContractVersion.WalletV5Beta, WalletLayout("wallet W5 beta", plain(WalletV5BetaData))),
        (ContractVersion.WalletV5R1, WalletLayout("wallet v5r1 (W5)", v5r1)),
        (
            ContractVersion.WalletTg,
            WalletLayout("Telegram wallet (WalletTg)", plain(WalletTgData), rotates=True),
        ),
    ):
        code = CONTRACT_CODES[version]
        cell = code if isinstance(code, Cell) else Cell.one_from_boc(code)
        layouts[cell.hash] = layout
    return layouts


_LAYOUTS: dict[bytes, WalletLayout] | None = None


def wallet_layouts() -> dict[bytes, WalletLayout]:
    global _LAYOUTS
    if _LAYOUTS is None:
        _LAYOUTS = _wallet_layouts()
    return _LAYOUTS


@dataclass(frozen=True)
class StateInitKey:
    """What a state init says: its wallet contract and the key it starts with."""

    wallet: WalletLayout
    code_hash: bytes
    public_key: bytes


def read_state_init(state_init_b64: str, address: str, network: str = "-239") -> StateInitKey:
    """The wallet and key of a state init that must hash to ``address``."""
    try:
        if len(state_init_b64) > MAX_STATE_INIT:
            raise ValueError("too long")
        text = state_init_b64.strip().replace("-", "+").replace("_", "/")
        cell = Cell.one_from_boc(base64.b64decode(text + "=" * (-len(text) % 4), validate=True))
        state = StateInit.deserialize(cell.begin_parse())
    except Exception:
        raise StateInitError("the wallet's state init is not readable") from None
    try:
        parsed = parse_address(address)
    except AddressError:
        raise StateInitError("the address is not a TON address") from None
    if cell.hash != parsed.hash_part:
        raise StateInitError("the wallet's state init does not match its address")
    layout = wallet_layouts().get(state.code.hash) if state.code is not None else None
    if layout is None or state.code is None or state.data is None:
        code = state.code.hash.hex()[:8] if state.code is not None else "none"
        raise StateInitError(f"the wallet's contract is not a known wallet (code hash {code}…)")
    try:
        key = layout.read_key(state.data.begin_parse(), network)
    except Exception:
        raise StateInitError(
            f"the wallet's data does not fit its contract ({layout.name})"
        ) from None
    return StateInitKey(layout, state.code.hash, key)
