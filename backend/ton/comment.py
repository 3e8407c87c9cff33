"""Addresses, text-comment cells and the TON Connect top-up message."""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass

from ton_core import Address, Cell, begin_cell

TEXT_COMMENT = 0
ENCRYPTED_COMMENT = 0x2167DA4B
MAX_MEMO_CHARS = 120  # what we keep of an undecodable or foreign comment, for admins


class AddressError(ValueError):
    """Text that is not a TON address."""


def parse_address(text: str) -> Address:
    try:
        return Address(text.strip())
    except Exception as error:  # pytoniq-core raises several kinds
        raise AddressError(f"not a TON address: {text!r}") from error


def raw_address(text: str | Address) -> str:
    """The raw form ``0:<64 hex>`` (upper case, as TON Center v3 writes it)."""
    address = text if isinstance(text, Address) else parse_address(text)
    workchain, hash_part = address.to_str(is_user_friendly=False).split(":")
    return f"{workchain}:{hash_part.upper()}"


def friendly_address(text: str | Address, *, bounceable: bool, testnet: bool = False) -> str:
    address = text if isinstance(text, Address) else parse_address(text)
    return address.to_str(
        is_user_friendly=True, is_bounceable=bounceable, is_url_safe=True, is_test_only=testnet
    )


def comment_cell(text: str) -> Cell:
    """A text comment: opcode 0 and the text as a snake string."""
    return begin_cell().store_uint(TEXT_COMMENT, 32).store_snake_string(text).end_cell()


def cell_to_b64(cell: Cell) -> str:
    return base64.b64encode(cell.to_boc()).decode()


@dataclass(frozen=True)
class DecodedBody:
    """What a message body says: ``memo`` is set only for a readable text comment."""

    memo: str | None
    note: str | None  # why there is no memo (empty body, other opcode, bad bytes)
    shown: str | None = None  # a printable excerpt, for admins


def decode_comment(body_b64: str | None) -> DecodedBody:
    """Decode a message body (base64 BOC). Never raises: odd input becomes a note."""
    if not body_b64:
        return DecodedBody(None, "no comment")
    try:
        slice_ = Cell.one_from_boc(base64.b64decode(body_b64)).begin_parse()
        if slice_.remaining_bits < 32:
            return DecodedBody(None, "no comment")
        opcode = slice_.load_uint(32)
        if opcode == ENCRYPTED_COMMENT:
            return DecodedBody(None, "encrypted comment")
        if opcode != TEXT_COMMENT:
            return DecodedBody(None, f"not a text comment (opcode {opcode:#010x})")
        raw = slice_.load_snake_bytes()
    except Exception as error:  # a malformed BOC must not stop the watcher
        return DecodedBody(None, f"unreadable body ({type(error).__name__})")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        shown = printable(raw[:MAX_MEMO_CHARS].decode("utf-8", "backslashreplace"))
        return DecodedBody(None, "comment is not UTF-8", shown)
    return DecodedBody(text, None, printable(text[:MAX_MEMO_CHARS]))


def printable(text: str) -> str:
    """Text safe to store and show: control characters (NUL included) become U+FFFD."""
    return "".join(c if c.isprintable() else "\ufffd" for c in text)


def deposit_message(
    deposit_address: str, memo: str, amount: int, *, testnet: bool = False
) -> dict[str, str]:
    """One TON Connect message: the deposit wallet, the amount (nanoTON, as a string) and the
    memo as a text-comment payload (base64 BOC)."""
    return {
        "address": friendly_address(deposit_address, bounceable=False, testnet=testnet),
        "amount": str(amount),
        "payload": cell_to_b64(comment_cell(memo)),
    }


def deposit_transaction(
    deposit_address: str,
    memo: str,
    amount: int,
    *,
    ttl_s: int = 300,
    testnet: bool = False,
    now: float | None = None,
) -> dict[str, object]:
    """The whole ``sendTransaction`` request a TON Connect wallet signs for a top-up."""
    message = deposit_message(deposit_address, memo, amount, testnet=testnet)
    return send_transaction([message], ttl_s=ttl_s, testnet=testnet, now=now)


def send_transaction(
    messages: list[dict[str, str]], *, ttl_s: int, testnet: bool, now: float | None
) -> dict[str, object]:
    """A TON Connect ``sendTransaction`` request of ``messages``, valid for ``ttl_s`` seconds
    from ``now`` (default: the clock), for the testnet's wallets when ``testnet``."""
    valid_until = int(now if now is not None else time.time()) + ttl_s
    request: dict[str, object] = {"validUntil": valid_until, "messages": messages}
    if testnet:
        request["network"] = "-3"
    return request
