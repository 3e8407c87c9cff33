"""The per-job stream key: one key exchange per job, then one AEAD per stream entry.

A job's request carries the reader's fresh X25519 reply key (``JobRequest.reply_key``). For each
job the worker makes a fresh X25519 key of its own, derives the job's stream key from the two
(libsodium ``crypto_kx``: BLAKE2b of the shared secret and both public keys) and seals each event
of the job with XChaCha20-Poly1305 under that key::

    entry 0:  0x02 | the worker's job key (32) | its Ed25519 signature (64) | ciphertext, tag (16)
    entry n:  0x02 | ciphertext, tag (16)

The nonce of entry ``n`` is ``n``, the event's place in the job's stream, and the associated
data names the job (and, for entry 0, holds its header): an entry tampered with, reordered,
replayed, or copied from another job's stream does not open. The signature, by the worker's
attested Ed25519 key over the job id, the reply key and the worker's job key, ties the stream to
that worker: nobody else (the operator included) can start a stream that opens. Only the holder
of the reply key's private half can read the stream; in sealed mode that is the client, never the
backend. The worker's job key is fresh per job, so no key and nonce pair is ever used twice,
even when a job id is retried.

One X25519 exchange and one signature per job; per entry, a symmetric AEAD (a few microseconds)
where each entry used to be a sealed box (an X25519 exchange of its own).
"""

from __future__ import annotations

import nacl.bindings
import nacl.exceptions
import nacl.public
import nacl.signing

from workers.wire import (
    MAX_SEALED_BYTES,
    Event,
    WireError,
    WorkerKeys,
    event_from_payload,
    event_payload,
    public_key,
)

__all__ = ["ENTRY_OVERHEAD", "FORMAT", "HEADER_BYTES", "StreamOpener", "StreamSealer"]

FORMAT = 2
"""The first byte of every stream entry (format 1 was a sealed box per entry)."""

_FORMAT = bytes([FORMAT])
_KEY_BYTES = 32
_SIGNATURE_BYTES = 64
_TAG_BYTES = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_ABYTES
_NONCE_BYTES = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES
HEADER_BYTES = 1 + _KEY_BYTES + _SIGNATURE_BYTES
"""The first entry's header: the format byte, the worker's job key and its signature."""
ENTRY_OVERHEAD = 1 + _TAG_BYTES
"""The bytes of any entry that are not its event's JSON (the first entry has 96 more)."""
_CONTEXT = b"cocoon-stream-v2"


def _signed_part(job_id: str, reply_key: bytes, job_key: bytes) -> bytes:
    return _CONTEXT + reply_key + job_key + job_id.encode()


def _associated(job_id: bytes, head: bytes) -> bytes:
    return _CONTEXT + len(job_id).to_bytes(2, "big") + job_id + head


def _nonce(place: int) -> bytes:
    return place.to_bytes(_NONCE_BYTES, "little")


class StreamSealer:
    """The worker's side of one job's stream: :meth:`seal` each event in the order written."""

    def __init__(self, job_id: str, reply_public_b64: str, keys: WorkerKeys) -> None:
        reply_key = bytes(public_key(reply_public_b64, "reply key"))
        job_key = nacl.public.PrivateKey.generate()
        job_public = bytes(job_key.public_key)
        try:
            _rx, self._key = nacl.bindings.crypto_kx_server_session_keys(
                job_public, bytes(job_key), reply_key
            )
        except nacl.exceptions.CryptoError as error:  # a low-order point, not a real key
            raise WireError("the reply key is not a usable X25519 key") from error
        signature = keys.signing_key.sign(_signed_part(job_id, reply_key, job_public)).signature
        self._header = _FORMAT + job_public + signature
        self._job_id = job_id.encode()
        self._keys = keys
        self.sealed = 0  # entries sealed so far: the next one's place

    def seal(self, event: Event) -> bytes:
        """The next stream entry, holding ``event`` (a final record signed with the keys)."""
        return self.seal_payload(event_payload(event, self._keys))

    def seal_payload(self, payload: bytes) -> bytes:
        """The next stream entry, holding ``payload`` as it is (:meth:`seal` makes it)."""
        head = self._header if self.sealed == 0 else _FORMAT
        box = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
            payload,
            _associated(self._job_id, head),
            _nonce(self.sealed),
            self._key,
        )
        self.sealed += 1
        return head + box


class StreamOpener:
    """The reader's side of one job's stream: :meth:`open` each entry in the order read.

    Any entry that does not open (another format, a bad signature, tampered with, out of its
    place, of another job or worker) raises :class:`~workers.wire.WireError`, and so does a
    final record without the worker's signature; the opener then stays where it was.
    """

    def __init__(
        self, reply_key: nacl.public.PrivateKey, worker_verify_key_b64: str, job_id: str
    ) -> None:
        self._reply_key = reply_key
        self._verify_key_b64 = worker_verify_key_b64
        self.job_id = job_id
        self._job_id = job_id.encode()
        self._key: bytes | None = None
        self.opened = 0  # entries opened so far: the next one's place

    def open(self, blob: bytes) -> Event:
        if not isinstance(blob, bytes | bytearray | memoryview):
            raise WireError("a stream entry must be bytes")
        blob = bytes(blob)
        if len(blob) > MAX_SEALED_BYTES:
            raise WireError(f"stream entry is too large ({len(blob)} bytes)")
        if not blob or blob[0] != FORMAT:
            raise WireError("stream entry of an unknown format")
        if self._key is None:
            if len(blob) < HEADER_BYTES + _TAG_BYTES:
                raise WireError("the stream's first entry is too short")
            head = blob[:HEADER_BYTES]
            key = self._first_key(head[1 : 1 + _KEY_BYTES], head[1 + _KEY_BYTES :])
        else:
            head, key = _FORMAT, self._key
        try:
            payload = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
                blob[len(head) :], _associated(self._job_id, head), _nonce(self.opened), key
            )
        except nacl.exceptions.CryptoError as error:
            raise WireError(
                f"stream entry {self.opened} does not open: tampered with, out of its place,"
                " or of another job"
            ) from error
        event = event_from_payload(payload, self._verify_key_b64, expected_job_id=self.job_id)
        self._key = key
        self.opened += 1
        return event

    def _first_key(self, job_public: bytes, signature: bytes) -> bytes:
        """The job's stream key, from the first entry's header once its signature verifies."""
        reply_public = bytes(self._reply_key.public_key)
        verify_key = nacl.signing.VerifyKey(
            bytes(public_key(self._verify_key_b64, "worker verify key"))
        )
        try:
            verify_key.verify(_signed_part(self.job_id, reply_public, job_public), signature)
        except nacl.exceptions.BadSignatureError as error:
            raise WireError("the stream is not signed by the worker's key") from error
        try:
            rx, _tx = nacl.bindings.crypto_kx_client_session_keys(
                reply_public, bytes(self._reply_key), job_public
            )
        except nacl.exceptions.CryptoError as error:
            raise WireError("the worker's job key is not a usable X25519 key") from error
        return bytes(rx)
