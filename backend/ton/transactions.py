"""What one transaction of the deposit wallet means: step 1 of :mod:`backend.ton.watcher`.

:func:`classify` reads a TON Center v3 transaction: external, bounced and zero-value messages,
and aborted transactions whose value really went back to the sender (a bounce phase that
succeeded), are ignored, each keeping its amount and the reason; a jetton transfer notification
is recorded as one, never as TON; a text comment is read as a deposit memo; anything else with
value is *unclaimed*. An aborted transaction that kept its value counts like any other: a
deposit wallet that never sent anything is ``uninit``, and every non-bounceable transfer to it
is aborted (compute skipped, ``no_state``) yet kept. Nothing here raises on odd input.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

from ton_core import Address, Cell

from backend.models import TonDepositStatus
from backend.settings import MAX_NANO
from backend.ton.comment import decode_comment, raw_address

__all__ = [
    "JETTON_TRANSFER_NOTIFICATION",
    "MAX_JETTON_AMOUNT",
    "Classified",
    "JettonNotification",
    "classify",
    "decode_jetton_notification",
    "hash_hex",
]

JETTON_TRANSFER_NOTIFICATION = 0x7362D09C
MAX_JETTON_AMOUNT = 2**120 - 1  # VarUInteger 16


def hash_hex(value: str) -> str:
    """A transaction hash as lower-case hex, whether TON Center gave base64 or hex."""
    text = value.strip()
    if len(text) == 64:
        try:
            bytes.fromhex(text)
            return text.lower()
        except ValueError:
            pass
    padded = text.replace("-", "+").replace("_", "/") + "=" * (-len(text) % 4)
    try:
        raw = base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise ValueError(f"not a transaction hash: {value!r}")
    return raw.hex()


@dataclass(frozen=True)
class JettonNotification:
    """What a jetton ``transfer_notification`` body says. Anyone can send such a body: it
    proves nothing until the sending jetton wallet is checked against the jetton's master."""

    amount: int | None  # in the jetton's smallest units; None when the body is malformed
    sender: str | None  # raw address of whoever the notification says sent the jettons
    memo: str | None  # the forward payload's text comment
    note: str | None  # why there is no memo (or why the body could not be read)
    shown: str | None = None  # the comment made printable, for storing and showing


def decode_jetton_notification(body_b64: str | None) -> JettonNotification | None:
    """A ``transfer_notification#7362d09c query_id:uint64 amount:(VarUInteger 16)
    sender:MsgAddress forward_payload:(Either Cell ^Cell)`` body; None for any other body.
    Never raises: a malformed notification comes back with ``amount`` None and a note."""
    if not body_b64:
        return None
    try:
        slice_ = Cell.one_from_boc(base64.b64decode(body_b64)).begin_parse()
        if slice_.remaining_bits < 32 or slice_.load_uint(32) != JETTON_TRANSFER_NOTIFICATION:
            return None
    except Exception:  # a malformed BOC is some other body: decode_comment says what
        return None
    try:
        slice_.load_uint(64)  # query_id
        amount = slice_.load_coins()
        address = slice_.load_address()
        payload = slice_.load_ref() if slice_.load_bit() else slice_.to_cell()
    except Exception as error:
        return JettonNotification(
            None, None, None, f"unreadable jetton notification ({type(error).__name__})"
        )
    if address is not None and not isinstance(address, Address):  # addr_extern: no wallet's
        return JettonNotification(None, None, None, "jetton notification from an external address")
    sender = None if address is None else raw_address(address)
    if amount is None or not 0 <= int(amount) <= MAX_JETTON_AMOUNT:
        return JettonNotification(None, sender, None, "jetton amount out of range")
    decoded = decode_comment(base64.b64encode(payload.to_boc()).decode())
    return JettonNotification(int(amount), sender, decoded.memo, decoded.note, decoded.shown)


@dataclass(frozen=True)
class Classified:
    status: TonDepositStatus
    amount: int
    source: str | None
    memo: str | None  # the comment, for matching a user
    note: str | None
    shown: str | None = None  # the comment made printable, for storing and showing
    jetton: JettonNotification | None = None


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _nano(value: object) -> int:
    """A nanoTON amount as TON Center writes it (a decimal string), else 0."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and 0 < len(value) <= 40 and value.isascii() and value.isdigit():
        return int(value)
    return 0


def _computed(description: dict[str, Any]) -> str:
    """The compute phase in a few words, in the 2024 and the 2026 format of TON Center."""
    phase = _dict(description.get("compute_ph"))
    if phase.get("skipped") is True or phase.get("type") == "skipped":
        reason = phase.get("reason") or phase.get("skip_reason")
        return f"compute skipped: {str(reason)[:20]}" if reason else "compute skipped"
    if "exit_code" in phase:
        return f"exit code {str(phase.get('exit_code'))[:12]}"
    return "compute failed"


def _bounce_phase(description: dict[str, Any]) -> object:
    """The bounce phase's type (``ok``, ``nofunds``, ``negfunds``), or None when the reply
    shows none (TON Center has written it as ``bounce`` and as ``bounce_ph``)."""
    phase = description.get("bounce", description.get("bounce_ph"))
    return _dict(phase).get("type")


def _went_back(description: dict[str, Any], tx: dict[str, Any], source: str) -> bool:
    """Whether the value of an aborted transaction went back to its sender. The bounce phase
    decides (``ok``: a bounce carried the value back; ``nofunds`` or ``negfunds``: no bounce
    could be paid for, the account kept it); without one, an outgoing bounced message to
    the sender does."""
    if description.get("aborted") is not True:
        return False
    phase = _bounce_phase(description)
    if phase is not None:
        return phase == "ok"
    out_msgs = tx.get("out_msgs")
    for out in out_msgs if isinstance(out_msgs, list) else []:
        out = _dict(out)
        if out.get("bounced") is True and _same_address(str(out.get("destination")), source):
            return True
    return False


def classify(tx: dict[str, Any], account: str) -> Classified:
    """What one transaction of the deposit wallet means. Never raises on odd input.

    An aborted transaction is ignored only when its value went back (:func:`_went_back`);
    otherwise it is credited or unclaimed like any other: on an uninit deposit wallet every
    non-bounceable transfer is aborted and keeps its value."""
    in_msg = _dict(tx.get("in_msg"))
    description = _dict(tx.get("description"))
    source = in_msg.get("source") or None
    if not isinstance(source, str):
        source = None if source is None else str(source)[:80]
    value = _nano(in_msg.get("value"))
    kept = value if 0 < value <= MAX_NANO else 0

    def ignored(note: str) -> Classified:
        return Classified(TonDepositStatus.IGNORED, kept, source, None, note)

    if not in_msg:
        return ignored("no incoming message")
    if not source:
        return ignored("external message")
    destination = in_msg.get("destination")
    if destination and _same_address(str(destination), account) is False:
        return ignored("message to another account")
    if in_msg.get("bounced"):
        return ignored("bounced message")
    if _went_back(description, tx, source):
        return ignored(f"aborted ({_computed(description)}), bounced back to the sender")
    content = _dict(in_msg.get("message_content"))
    body = content.get("body")
    body = body if isinstance(body, str) else None
    decoded = decode_comment(body)  # a text comment is no jetton notification: one parse
    jetton = decode_jetton_notification(body) if decoded.memo is None else None
    if jetton is not None:
        note = "jetton transfer notification (jetton wallet not verified): not credited as TON"
        if jetton.note and jetton.amount is None:
            note = f"{note}; {jetton.note}"
        return Classified(TonDepositStatus.JETTON, kept, source, None, note, jetton.shown, jetton)
    if value <= 0:
        return ignored("zero value")
    if value > MAX_NANO:  # more than all TON in existence: an admin looks at it
        return Classified(TonDepositStatus.UNCLAIMED, 0, source, None, f"value {value} too large")
    aborted = None
    if description.get("aborted") is True:
        if in_msg.get("bounce") is not False and _bounce_phase(description) is None:
            # Bounceable (or not said) and aborted, yet the reply shows no bounce: never
            # guess whether the value went back; an admin checks the chain.
            note = (
                f"aborted ({_computed(description)}), bounceable, and the reply shows no "
                "bounce phase: check on chain that the value stayed before resolving"
            )
            return Classified(TonDepositStatus.UNCLAIMED, value, source, None, note, decoded.shown)
        aborted = f"aborted ({_computed(description)}), value kept"
    if decoded.memo is None:
        why = decoded.note if aborted is None else f"{decoded.note}; {aborted}"
        return Classified(TonDepositStatus.UNCLAIMED, value, source, None, why, decoded.shown)
    return Classified(
        TonDepositStatus.CREDITED, value, source, decoded.memo, aborted, decoded.shown
    )


def _same_address(a: str, b: str) -> bool | None:
    try:
        return raw_address(a) == raw_address(b)
    except ValueError:
        return None
