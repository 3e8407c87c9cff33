"""The hot wallet (wallet v4r2): keys from a mnemonic, transfers signed offline.

Keys come from tonutils (mnemonic → ed25519, the v4r2 code and state init, so the address is
the one every TON wallet app shows for these words). The external message is built here, bit by
bit, so that signing needs no network: seqno and valid_until are given by the caller, and the
same inputs always give the same BOC.

v4r2 external body: ``signature:bits512 subwallet_id:uint32 valid_until:uint32 seqno:uint32
op:uint8(0) (send_mode:uint8 ^InternalMessage)*`` and the signature is ed25519 over the hash of
the cell without it.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey
from ton_core import Address, Cell, Slice, StateInit, begin_cell, normalize_hash
from ton_core.tlb.transaction import ExternalMsgInfo, InternalMsgInfo, MessageAny
from tonutils.contracts.wallet.messages import ExternalMessage, InternalMessage
from tonutils.contracts.wallet.versions.v4 import WalletV4R2

from backend.ton.comment import comment_cell, decode_comment, raw_address

SEND_MODE = 3  # pay forwarding fees separately, ignore errors (the payout then finds no out msg)
MAX_UINT32 = 2**32 - 1


class WalletError(ValueError):
    """A hot wallet that cannot be made or a transfer that cannot be signed."""


@dataclass(frozen=True)
class SignedTransfer:
    boc: str  # base64 BOC of the whole external message
    msg_hash: str  # its normalized hash, hex (what TON Center indexes as hash_norm)
    seqno: int
    valid_until: int


@dataclass(frozen=True)
class TransferOut:
    destination: str  # raw
    amount: int
    comment: str | None
    bounce: bool
    send_mode: int


@dataclass(frozen=True)
class ParsedExternal:
    """An external message of a v4r2 wallet, taken apart (for checks and the local TON Center)."""

    wallet: str  # raw
    subwallet_id: int
    valid_until: int
    seqno: int
    signature: bytes
    signed_hash: bytes
    transfers: tuple[TransferOut, ...]
    state_init: StateInit | None
    msg_hash: str

    def verifies(self, public_key: bytes) -> bool:
        try:
            VerifyKey(public_key).verify(self.signed_hash, self.signature)
        except BadSignatureError:
            return False
        return True


class HotWallet:
    """A wallet v4r2 with its private key, able to sign transfers offline."""

    def __init__(self, seed: bytes, *, workchain: int = 0) -> None:
        from ton_core import PrivateKey

        if len(seed) != 32:
            raise WalletError("an ed25519 seed is 32 bytes")
        private = PrivateKey(seed)
        # No client: deriving the address and state init is offline (tonutils types ask for one).
        wallet = WalletV4R2.from_private_key(None, private)  # type: ignore[arg-type]
        self._signing_key = SigningKey(seed)
        self.public_key: bytes = bytes(self._signing_key.verify_key)
        self.subwallet_id: int = wallet.config.subwallet_id
        if wallet.state_init is None:
            raise WalletError("the wallet library made no state init")
        self.state_init: StateInit = wallet.state_init
        self.address: Address = wallet.address
        if workchain != 0:
            raise WalletError("the hot wallet lives in the basechain (workchain 0)")

    @classmethod
    def from_mnemonic(cls, mnemonic: str) -> HotWallet:
        words = mnemonic.strip().lower().split()
        try:
            # No client, as above: the keys come from the words alone.
            _wallet, _public, private, _words = WalletV4R2.from_mnemonic(None, words)  # type: ignore[arg-type]
        except Exception:
            # Never echo the words themselves, not even in a chained traceback.
            raise WalletError(
                f"the hot wallet mnemonic is not valid ({len(words)} words)"
            ) from None
        return cls(private.as_bytes)

    @property
    def raw(self) -> str:
        return raw_address(self.address)

    def friendly(self, *, testnet: bool = False) -> str:
        return self.address.to_str(
            is_user_friendly=True, is_bounceable=True, is_url_safe=True, is_test_only=testnet
        )

    def sign_transfer(
        self,
        destination: str,
        amount: int,
        *,
        seqno: int,
        valid_until: int,
        comment: str | None = None,
        bounce: bool = False,
    ) -> SignedTransfer:
        """Sign one transfer; deterministic for the same inputs. Nothing is sent."""
        if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
            raise WalletError(f"amount must be a positive whole number of nanoTON, got {amount!r}")
        if not 0 <= seqno <= MAX_UINT32 or not 0 < valid_until <= MAX_UINT32:
            raise WalletError("seqno and valid_until must fit 32 bits")
        try:
            dest = Address(destination.strip())
        except Exception:
            raise WalletError(f"not a TON address: {destination!r}") from None
        message = InternalMessage(
            dest=dest,
            value=amount,
            bounce=bounce,
            body=comment_cell(comment) if comment else None,
        )
        unsigned = (
            begin_cell()
            .store_uint(self.subwallet_id, 32)
            .store_uint(valid_until, 32)
            .store_uint(seqno, 32)
            .store_uint(0, 8)
            .store_uint(SEND_MODE, 8)
            .store_ref(message.serialize())
            .end_cell()
        )
        signature = self._signing_key.sign(unsigned.hash).signature
        body = begin_cell().store_bytes(signature).store_cell(unsigned).end_cell()
        external = ExternalMessage(
            dest=self.address, body=body, state_init=self.state_init if seqno == 0 else None
        )
        boc = base64.b64encode(external.serialize().to_boc()).decode()
        return SignedTransfer(boc, normalize_hash(external), seqno, valid_until)


def parse_external(boc_b64: str) -> ParsedExternal:
    """Take a v4r2 external message apart. Raises WalletError on anything else."""
    try:
        message = MessageAny.deserialize(Slice.one_from_boc(base64.b64decode(boc_b64)))
        if not isinstance(message.info, ExternalMsgInfo):
            raise WalletError("not an external message")
        if message.info.dest is None:
            raise WalletError("an external message to no wallet")
        body: Slice = message.body.begin_parse()
        signature = body.load_bytes(64)
        unsigned: Cell = body.to_cell()
        subwallet_id = body.load_uint(32)
        valid_until = body.load_uint(32)
        seqno = body.load_uint(32)
        op = body.load_uint(8)
        if op != 0:
            raise WalletError(f"unsupported wallet op {op}")
        transfers = []
        while body.remaining_refs:
            mode = body.load_uint(8)
            internal = MessageAny.deserialize(body.load_ref().begin_parse())
            info = internal.info
            if not isinstance(info, InternalMsgInfo):
                raise WalletError("a wallet transfer that is not an internal message")
            body_cell = internal.body
            comment = None
            if body_cell is not None and (body_cell.bits or body_cell.refs):
                comment = decode_comment(base64.b64encode(body_cell.to_boc()).decode()).memo
            transfers.append(
                TransferOut(
                    destination=raw_address(info.dest),
                    amount=int(info.value.grams),
                    comment=comment,
                    bounce=bool(info.bounce),
                    send_mode=mode,
                )
            )
        return ParsedExternal(
            wallet=raw_address(message.info.dest),
            subwallet_id=subwallet_id,
            valid_until=valid_until,
            seqno=seqno,
            signature=signature,
            signed_hash=unsigned.hash,
            transfers=tuple(transfers),
            state_init=message.init,
            msg_hash=normalize_hash(message),
        )
    except WalletError:
        raise
    except Exception as error:
        raise WalletError(f"not a wallet v4r2 external message ({type(error).__name__})") from None


def new_mnemonic() -> str:
    """24 fresh words (for tests and for setting up a development hot wallet)."""
    from ton_core import mnemonic_new

    return " ".join(mnemonic_new(24))
