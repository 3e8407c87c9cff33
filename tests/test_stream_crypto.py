"""The per-job stream key (workers.stream_crypto): one key exchange per job, an AEAD per entry,
each entry bound to its place and its job (real libsodium)."""

from __future__ import annotations

import base64

import pytest

from workers.stream_crypto import ENTRY_OVERHEAD, HEADER_BYTES, StreamOpener, StreamSealer
from workers.wire import (
    FinalRecord,
    StreamChunk,
    WireError,
    WorkerKeys,
    canonical_json,
    new_reply_keypair,
    public_b64,
)

JOB = "w-0123456789abcdef_job-1"
CANARY = "canary-51b2: the patient's name is Ada Lovelace"


def chunks(job_id: str, *texts: str) -> list[StreamChunk]:
    return [StreamChunk(job_id=job_id, seq=n, text=t) for n, t in enumerate(texts)]


@pytest.fixture
def worker() -> WorkerKeys:
    return WorkerKeys.generate()


def stream(worker: WorkerKeys, job_id: str = JOB, *texts: str):  # type: ignore[no-untyped-def]
    reply = new_reply_keypair()
    sealer = StreamSealer(job_id, public_b64(reply), worker)
    blobs = [sealer.seal(c) for c in chunks(job_id, *(texts or ("one", " two", " three")))]
    final = FinalRecord(
        job_id=job_id,
        prompt_tokens=3,
        cached_prompt_tokens=0,
        completion_tokens=3,
        finish_reason="stop",
    )
    blobs.append(sealer.seal(final))
    return reply, blobs


def test_a_stream_opens_in_order_and_only_the_first_entry_carries_the_key(worker):
    reply, blobs = stream(worker)
    opener = StreamOpener(reply, worker.verify_key_b64, JOB)
    events = [opener.open(b) for b in blobs]
    assert [e.text for e in events[:3]] == ["one", " two", " three"]  # type: ignore[union-attr]
    assert isinstance(events[3], FinalRecord)
    sent = chunks(JOB, "one", " two")
    assert len(blobs[0]) == HEADER_BYTES - 1 + ENTRY_OVERHEAD + len(canonical_json(sent[0]))
    assert len(blobs[1]) == ENTRY_OVERHEAD + len(canonical_json(sent[1]))


def test_the_text_is_nowhere_in_the_entries(worker):
    _reply, blobs = stream(worker, JOB, CANARY)
    assert all(CANARY.encode() not in b and b"canary" not in b for b in blobs)


@pytest.mark.parametrize("order", [[1], [0, 2], [0, 1, 1], [0, 0]])
def test_an_entry_out_of_its_place_is_refused(worker, order):
    """Dropped, reordered or replayed: the entry at the wrong place does not open."""
    reply, blobs = stream(worker)
    opener = StreamOpener(reply, worker.verify_key_b64, JOB)
    for index in order[:-1]:
        opener.open(blobs[index])
    with pytest.raises(WireError, match=r"first entry|out of its place"):
        opener.open(blobs[order[-1]])


def test_an_entry_tampered_with_is_refused_and_the_opener_stays_put(worker):
    reply, blobs = stream(worker)
    opener = StreamOpener(reply, worker.verify_key_b64, JOB)
    opener.open(blobs[0])
    for at in (1, len(blobs[1]) // 2, len(blobs[1]) - 1):
        tampered = bytearray(blobs[1])
        tampered[at] ^= 0x01
        with pytest.raises(WireError, match="does not open"):
            opener.open(bytes(tampered))
    assert opener.open(blobs[1]).text == " two"  # type: ignore[union-attr]


def test_a_header_tampered_with_is_refused(worker):
    reply, blobs = stream(worker)
    for at in (0, 1, 40, HEADER_BYTES - 1, HEADER_BYTES + 1):
        tampered = bytearray(blobs[0])
        tampered[at] ^= 0x01
        with pytest.raises(WireError):
            StreamOpener(reply, worker.verify_key_b64, JOB).open(bytes(tampered))


def test_entries_cannot_move_between_jobs(worker):
    """Another job's stream, even to the same reply key and by the same worker, opens only as
    that job's."""
    reply = new_reply_keypair()
    other = "w-0123456789abcdef_job-2"
    blob = StreamSealer(other, public_b64(reply), worker).seal(chunks(other, "x")[0])
    with pytest.raises(WireError, match="signed"):
        StreamOpener(reply, worker.verify_key_b64, JOB).open(blob)
    # Spliced: a later entry of another job of the same client after this job's first.
    _reply_a, blobs_a = stream(worker)
    sealer_b = StreamSealer(other, public_b64(_reply_a), worker)
    blobs_b = [sealer_b.seal(c) for c in chunks(other, "a", "b")]
    opener = StreamOpener(_reply_a, worker.verify_key_b64, JOB)
    opener.open(blobs_a[0])
    with pytest.raises(WireError, match="does not open"):
        opener.open(blobs_b[1])


def test_a_stream_started_by_anyone_but_the_worker_is_refused(worker):
    """Who knows the reply key's public half (the operator, in sealed mode too) cannot forge
    a stream: its first entry must be signed by the worker's attested key."""
    impostor = WorkerKeys.generate()
    reply, blobs = stream(impostor)
    with pytest.raises(WireError, match="not signed by the worker"):
        StreamOpener(reply, worker.verify_key_b64, JOB).open(blobs[0])


def test_only_the_reply_key_opens_the_stream(worker):
    """The worker signed the stream for one reply key: no other key gets as far as opening."""
    _reply, blobs = stream(worker)
    with pytest.raises(WireError, match="not signed by the worker"):
        StreamOpener(new_reply_keypair(), worker.verify_key_b64, JOB).open(blobs[0])


def test_each_job_run_has_a_key_of_its_own(worker):
    """The same job sealed twice (a retry on the same worker) never reuses a key and nonce."""
    reply = new_reply_keypair()
    chunk = chunks(JOB, "same")[0]
    first = StreamSealer(JOB, public_b64(reply), worker).seal(chunk)
    second = StreamSealer(JOB, public_b64(reply), worker).seal(chunk)
    assert first[1:33] != second[1:33]
    assert first[HEADER_BYTES:] != second[HEADER_BYTES:]


@pytest.mark.parametrize("blob", [b"", b"\x01" + bytes(200), b"\x02" + bytes(20), "text"])
def test_malformed_entries_are_refused(worker, blob):
    with pytest.raises(WireError):
        StreamOpener(new_reply_keypair(), worker.verify_key_b64, JOB).open(blob)  # type: ignore[arg-type]


def test_a_low_order_reply_key_is_refused(worker):
    with pytest.raises(WireError, match="usable"):
        StreamSealer(JOB, base64.b64encode(bytes(32)).decode(), worker)
