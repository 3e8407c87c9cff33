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
        return signed_by(public_key, self.signed_hash, self.signature)


def signed_by(public_key: bytes, signed_hash: bytes, signature: bytes) -> bool:
    """Whether ``signature`` over ``signed_hash`` is the ed25519 key ``public_key``'s."""
    try:
        VerifyKey(public_key).verify(signed_hash, signature)
    except BadSignatureError:
        return False
    return True


class _Addressed:
    """A hot wallet's address, raw and user-friendly."""

    address: Address

    @property
    def raw(self) -> str:
        return raw_address(self.address)

    def friendly(self, *, testnet: bool = False) -> str:
        return self.address.to_str(
            is_user_friendly=True, is_bounceable=True, is_url_safe=True, is_test_only=testnet
        )


class HotWallet(_Addressed):
    """A wallet v4r2 with its private key, able to sign transfers offline."""

    kind = "v4r2"

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
    def seed(self) -> bytes:
        """The ed25519 seed (a secret: never logged) the words give, for the same key's
        highload wallet."""
        return bytes(self._signing_key)

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
            transfers.append(read_transfer(body.load_ref(), mode))
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


# ------------------------------------------------------------------ Highload Wallet v3

# Transfers in one batch: the library packs 253 transfers per action list (and a link to the
# next list past that), so 253 run in one transaction of the wallet, its 254 messages at most.
HIGHLOAD_MAX_MESSAGES = 253
HIGHLOAD_BIT_NUMBERS = 1023  # bit numbers 0..1022 of a query id (1023 reads past the bitmap)
HIGHLOAD_SHIFTS = 8192  # the query id's 13-bit shift
HIGHLOAD_QUERY_IDS = HIGHLOAD_BIT_NUMBERS * HIGHLOAD_SHIFTS
INTERNAL_TRANSFER = 0xAE42E5A4


def highload_query_id(sequence: int) -> int:
    """The 23-bit query id (``shift << 10 | bit_number``) of the wallet's ``sequence``-th batch:
    consecutive batches take consecutive ids, and the same id comes back only after
    8,380,416 batches (by then the contract forgot it and refuses the old message's
    ``created_at`` anyway)."""
    if sequence < 0:
        raise WalletError("a batch sequence is never negative")
    slot = sequence % HIGHLOAD_QUERY_IDS
    return (slot // HIGHLOAD_BIT_NUMBERS) << 10 | slot % HIGHLOAD_BIT_NUMBERS


@dataclass(frozen=True)
class BatchTransfer:
    """One payout inside a highload batch."""

    destination: str
    amount: int
    comment: str


@dataclass(frozen=True)
class SignedBatch:
    boc: str  # base64 BOC of the external message
    msg_hash: str  # normalized hash, hex
    query_id: int
    created_at: int
    timeout: int


@dataclass(frozen=True)
class ParsedHighload:
    """A Highload Wallet v3 external message taken apart (the local TON Center runs it)."""

    wallet: str  # raw
    subwallet_id: int
    query_id: int
    created_at: int
    timeout: int
    send_mode: int
    signature: bytes
    signed_hash: bytes
    message_to_send: Cell  # one internal message: a payout, or ``internal_transfer`` to itself
    state_init: StateInit | None
    msg_hash: str

    @property
    def shift(self) -> int:
        return self.query_id >> 10

    @property
    def bit_number(self) -> int:
        return self.query_id & 1023

    def verifies(self, public_key: bytes) -> bool:
        return signed_by(public_key, self.signed_hash, self.signature)


class HighloadHotWallet(_Addressed):
    """A Highload Wallet v3 (code, data layout and message packing from tonutils) with its
    key: signs batches of up to 253 transfers offline, each batch under its own query id."""

    kind = "highload_v3"

    def __init__(self, seed: bytes, *, timeout: int) -> None:
        from ton_core import PrivateKey, WalletHighloadV3Config
        from tonutils.contracts.wallet.versions.hw import WalletHighloadV3R1

        if len(seed) != 32:
            raise WalletError("an ed25519 seed is 32 bytes")
        if not 5 <= timeout < 2**22:
            raise WalletError("the highload wallet's timeout is 5 s .. 48 days")
        # No client: the address, the state init and the packing are offline.
        self._wallet = WalletHighloadV3R1.from_private_key(
            None,  # type: ignore[arg-type]
            PrivateKey(seed),
            config=WalletHighloadV3Config(timeout=timeout),
        )
        self._signing_key = SigningKey(seed)
        self.public_key: bytes = bytes(self._signing_key.verify_key)
        self.subwallet_id: int = self._wallet.config.subwallet_id
        self.timeout = timeout
        if self._wallet.state_init is None:
            raise WalletError("the wallet library made no state init")
        self.state_init: StateInit = self._wallet.state_init
        self.address: Address = self._wallet.address

    @classmethod
    def from_mnemonic(cls, mnemonic: str, *, timeout: int) -> HighloadHotWallet:
        return cls(HotWallet.from_mnemonic(mnemonic).seed, timeout=timeout)

    async def sign_batch(
        self,
        transfers: list[BatchTransfer],
        *,
        query_id: int,
        created_at: int,
        deploy: bool = False,
    ) -> SignedBatch:
        """Sign one external message paying ``transfers`` (1..253), deterministic for the
        same inputs. ``deploy``: carry the state init (the wallet is not deployed yet)."""
        from ton_core import WalletHighloadV3Params, WalletMessage

        if not 1 <= len(transfers) <= HIGHLOAD_MAX_MESSAGES:
            raise WalletError(f"a batch pays 1..{HIGHLOAD_MAX_MESSAGES} transfers")
        if not 0 <= query_id < 2**23 or query_id & 1023 >= HIGHLOAD_BIT_NUMBERS:
            raise WalletError("not a highload query id")
        if not 0 < created_at < 2**32:
            raise WalletError("created_at must be a unix time")
        messages = []
        for transfer in transfers:
            amount = transfer.amount
            if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
                raise WalletError(f"amount must be a positive whole number, got {amount!r}")
            try:
                dest = Address(transfer.destination.strip())
            except Exception:
                raise WalletError(f"not a TON address: {transfer.destination!r}") from None
            message = InternalMessage(
                dest=dest, value=amount, bounce=False, body=comment_cell(transfer.comment)
            )
            messages.append(WalletMessage(send_mode=SEND_MODE, message=message))
        params = WalletHighloadV3Params(
            query_id=query_id, created_at=created_at, send_mode=SEND_MODE
        )
        unsigned = await self._wallet._build_msg_cell(messages, params)
        signature = self._signing_key.sign(unsigned.hash).signature
        body = await self._wallet._build_sign_msg_cell(unsigned, signature)
        external = ExternalMessage(
            dest=self.address, body=body, state_init=self.state_init if deploy else None
        )
        boc = base64.b64encode(external.serialize().to_boc()).decode()
        return SignedBatch(boc, normalize_hash(external), query_id, created_at, self.timeout)


def parse_highload(boc_b64: str) -> ParsedHighload:
    """Take a Highload Wallet v3 external message apart (``signature:bits512 ^msg_inner``).
    Raises WalletError on anything else."""
    try:
        message = MessageAny.deserialize(Slice.one_from_boc(base64.b64decode(boc_b64)))
        if not isinstance(message.info, ExternalMsgInfo) or message.info.dest is None:
            raise WalletError("not an external message to a wallet")
        body: Slice = message.body.begin_parse()
        inner: Cell = body.load_ref()
        signature = body.load_bytes(64)
        if body.remaining_bits or body.remaining_refs:
            raise WalletError("extra data after the signature")
        fields = inner.begin_parse()
        subwallet_id = fields.load_uint(32)
        message_to_send = fields.load_ref()
        send_mode = fields.load_uint(8)
        query_id = fields.load_uint(23)
        created_at = fields.load_uint(64)
        timeout = fields.load_uint(22)
        if fields.remaining_bits or fields.remaining_refs:
            raise WalletError("extra data in the signed part")
        return ParsedHighload(
            wallet=raw_address(message.info.dest),
            subwallet_id=subwallet_id,
            query_id=query_id,
            created_at=created_at,
            timeout=timeout,
            send_mode=send_mode,
            signature=signature,
            signed_hash=inner.hash,
            message_to_send=message_to_send,
            state_init=message.init,
            msg_hash=normalize_hash(message),
        )
    except WalletError:
        raise
    except Exception as error:
        raise WalletError(f"not a highload wallet v3 message ({type(error).__name__})") from None


def read_transfer(cell: Cell, send_mode: int) -> TransferOut:
    """An internal message a wallet sends, as a transfer (raises on anything else)."""
    internal = MessageAny.deserialize(cell.begin_parse())
    info = internal.info
    if not isinstance(info, InternalMsgInfo):
        raise WalletError("a wallet transfer that is not an internal message")
    body_cell = internal.body
    comment = None
    if body_cell is not None and (body_cell.bits or body_cell.refs):
        comment = decode_comment(base64.b64encode(body_cell.to_boc()).decode()).memo
    return TransferOut(
        destination=raw_address(info.dest),
        amount=int(info.value.grams),
        comment=comment,
        bounce=bool(info.bounce),
        send_mode=send_mode,
    )
