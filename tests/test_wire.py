"""The wire contract: schemas, sealing to the worker, signed usage records (real libsodium)."""

from __future__ import annotations

import base64
import json

import nacl.public
import pytest
from pydantic import ValidationError

from workers.stream_crypto import StreamOpener, StreamSealer
from workers.wire import (
    WIRE_VERSION,
    ChatMessage,
    ErrorRecord,
    FinalRecord,
    JobRequest,
    ResponseFormat,
    SamplingParams,
    StreamChunk,
    WireError,
    WorkerKeys,
    canonical_json,
    event_payload,
    new_reply_keypair,
    open_request,
    public_b64,
    seal_request,
)

CANARY = "canary-7f3a: my secret diagnosis is zebra-fish"


@pytest.fixture
def worker() -> WorkerKeys:
    return WorkerKeys.generate()


@pytest.fixture
def reply_key() -> nacl.public.PrivateKey:
    return new_reply_keypair()


def make_request(reply: nacl.public.PrivateKey, **overrides: object) -> JobRequest:
    fields: dict[str, object] = {
        "job_id": "job_01-abc",
        "model": "qwen3-8b",
        "messages": [
            ChatMessage(role="system", content="Be brief."),
            ChatMessage(role="user", content=CANARY),
        ],
        "sampling": SamplingParams(temperature=0.2, top_p=0.9, stop=["\n\n"], seed=42),
        "max_tokens": 256,
        "reply_key": public_b64(reply),
        "conversation_id": "conv-9",
    }
    fields.update(overrides)
    return JobRequest(**fields)


def final_record(**overrides: object) -> FinalRecord:
    fields: dict[str, object] = {
        "job_id": "job_01-abc",
        "prompt_tokens": 120,
        "cached_prompt_tokens": 100,
        "completion_tokens": 37,
        "finish_reason": "stop",
    }
    fields.update(overrides)
    return FinalRecord(**fields)


JOB = "job_01-abc"


def seal_event(event: object, reply_key: nacl.public.PrivateKey, worker: WorkerKeys) -> bytes:
    """``event`` as the first entry of job JOB's stream, by ``worker``."""
    return StreamSealer(JOB, public_b64(reply_key), worker).seal(event)  # type: ignore[arg-type]


def seal_raw(payload: bytes, reply_key: nacl.public.PrivateKey, worker: WorkerKeys) -> bytes:
    """Any bytes as the first entry of job JOB's stream, as a modified node could seal them."""
    return StreamSealer(JOB, public_b64(reply_key), worker).seal_payload(payload)


def open_event(blob: bytes, reply_key: nacl.public.PrivateKey, verify_key_b64: str) -> object:
    """The first entry of job JOB's stream, opened as the backend opens it."""
    return StreamOpener(reply_key, verify_key_b64, JOB).open(blob)


def seal_json_to_worker(data: dict, worker: WorkerKeys) -> bytes:
    pub = nacl.public.PublicKey(base64.b64decode(worker.box_public_b64))
    return nacl.public.SealedBox(pub).encrypt(json.dumps(data).encode())


# -- requests -----------------------------------------------------------------------------------


def test_request_round_trips_through_the_worker(worker, reply_key):
    request = make_request(reply_key)
    opened = open_request(seal_request(request, worker.box_public_b64), worker)
    assert opened == request
    assert opened.messages[1].content == CANARY
    assert opened.sampling.stop == ["\n\n"]
    assert opened.v == WIRE_VERSION


def test_request_sealed_to_worker_a_cannot_be_opened_by_worker_b(worker, reply_key):
    other = WorkerKeys.generate()
    blob = seal_request(make_request(reply_key), worker.box_public_b64)
    with pytest.raises(WireError, match="cannot decrypt"):
        open_request(blob, other)


def test_sealed_bytes_never_contain_the_prompt_or_reply(worker, reply_key):
    blob = seal_request(make_request(reply_key), worker.box_public_b64)
    chunk = seal_event(StreamChunk(job_id=JOB, seq=0, text=CANARY), reply_key, worker)
    for sealed in (blob, chunk):
        assert CANARY.encode() not in sealed
        assert b"canary" not in sealed
        assert b"job_01-abc" not in sealed


def test_corrupted_request_is_refused(worker, reply_key):
    blob = bytearray(seal_request(make_request(reply_key), worker.box_public_b64))
    blob[-1] ^= 0x01
    with pytest.raises(WireError):
        open_request(bytes(blob), worker)


def test_unknown_request_version_is_refused_before_other_checks(worker):
    # Everything else is invalid too: the version must be what is reported.
    with pytest.raises(WireError, match="unsupported wire version 1"):
        open_request(seal_json_to_worker({"v": 1, "anything": "old"}, worker), worker)


def test_request_without_version_is_refused(worker, reply_key):
    data = json.loads(canonical_json(make_request(reply_key)))
    del data["v"]
    with pytest.raises(WireError, match="missing wire version"):
        open_request(seal_json_to_worker(data, worker), worker)


def test_constructing_another_version_is_refused(reply_key):
    with pytest.raises(ValidationError, match="unsupported wire version 3"):
        make_request(reply_key, v=3)


@pytest.mark.parametrize(
    "bad_key",
    [
        "not base64!!",
        base64.b64encode(b"\x01" * 31).decode(),  # wrong length
        base64.b64encode(b"\x01" * 33).decode(),
        "",
    ],
)
def test_invalid_reply_key_is_refused(worker, reply_key, bad_key):
    with pytest.raises(ValidationError, match="reply_key"):
        make_request(reply_key, reply_key=bad_key)
    data = json.loads(canonical_json(make_request(reply_key)))
    data["reply_key"] = bad_key
    with pytest.raises(WireError, match="reply_key"):
        open_request(seal_json_to_worker(data, worker), worker)


def test_extra_request_field_is_refused(worker, reply_key):
    data = json.loads(canonical_json(make_request(reply_key)))
    data["billing_override"] = 0
    with pytest.raises(WireError, match="billing_override"):
        open_request(seal_json_to_worker(data, worker), worker)


def test_extra_field_in_nested_message_is_refused(worker, reply_key):
    data = json.loads(canonical_json(make_request(reply_key)))
    data["messages"][0]["name"] = "x"
    with pytest.raises(WireError, match=r"messages\.0\.name"):
        open_request(seal_json_to_worker(data, worker), worker)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("job_id", "has space"),
        ("job_id", "x" * 65),
        ("messages", []),
        ("max_tokens", 0),
        ("max_tokens", 1_000_001),
        ("max_tokens", "256"),  # no silent coercion from strings
        ("sampling", {"temperature": 2.5}),
        ("sampling", {"top_p": 0}),
        ("sampling", {"stop": ["a", "b", "c", "d", "e"]}),
        ("sampling", {"stop": [""]}),
        ("messages", [{"role": "tool", "content": "x"}]),
        ("sampling", {"presence_penalty": 2.01}),
        ("sampling", {"frequency_penalty": -1e9}),
        ("sampling", {"presence_penalty": "NaN"}),
        ("sampling", {"response_format": {"type": "json_schema", "json_schema": "{" * 32_769}}),
        ("sampling", {"response_format": {"type": "json_schema"}}),
        ("sampling", {"response_format": {"type": "json_object", "json_schema": "{}"}}),
        ("sampling", {"response_format": {"type": "grammar", "json_schema": None}}),
        ("sampling", {"response_format": {"type": "json_object", "extra": 1}}),
        ("sampling", {"continue_final_message": 1}),
        ("sampling", {"logit_bias": {"1": 100.5}}),
        ("sampling", {"logit_bias": {"-1": 1.0}}),
        ("sampling", {"logit_bias": {"1234567890": 1.0}}),
        ("sampling", {"logit_bias": {str(n): 1.0 for n in range(301)}}),
    ],
)
def test_out_of_bounds_request_is_refused(worker, reply_key, field, value):
    data = json.loads(canonical_json(make_request(reply_key)))
    data[field] = value
    with pytest.raises(WireError, match=f"invalid request: {field}"):
        open_request(seal_json_to_worker(data, worker), worker)


def test_a_json_reply_request_round_trips(worker, reply_key):
    schema = json.dumps({"type": "object", "properties": {"n": {"type": "integer"}}})
    sampling = SamplingParams(
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        response_format=ResponseFormat(type="json_schema", json_schema=schema),
        logit_bias={"42": -100.0, "7": 5.5},
    )
    request = make_request(reply_key).model_copy(update={"sampling": sampling})
    opened = open_request(seal_request(request, worker.box_public_b64), worker)
    assert opened.sampling == sampling


def test_only_an_assistant_message_last_can_be_continued(worker, reply_key):
    data = json.loads(canonical_json(make_request(reply_key)))
    data["sampling"]["continue_final_message"] = True  # the last message is the user's
    with pytest.raises(WireError, match="continue_final_message needs an assistant"):
        open_request(seal_json_to_worker(data, worker), worker)
    data["messages"].append({"role": "assistant", "content": "Once upon"})
    assert open_request(seal_json_to_worker(data, worker), worker).sampling.continue_final_message


def test_validation_errors_do_not_echo_the_prompt(worker, reply_key):
    data = json.loads(canonical_json(make_request(reply_key)))
    data["messages"][1]["role"] = CANARY
    with pytest.raises(WireError) as caught:
        open_request(seal_json_to_worker(data, worker), worker)
    assert "canary" not in str(caught.value)


def test_non_json_request_is_refused(worker):
    pub = nacl.public.PublicKey(base64.b64decode(worker.box_public_b64))
    blob = nacl.public.SealedBox(pub).encrypt(b"\x80garbage")
    with pytest.raises(WireError, match="malformed request"):
        open_request(blob, worker)


def test_seal_request_refuses_a_bad_worker_key(reply_key):
    with pytest.raises(WireError, match="worker box key"):
        seal_request(make_request(reply_key), "AAAA")


# -- events -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "event",
    [
        StreamChunk(job_id=JOB, seq=3, text="Привет, 世界 🙂"),
        ErrorRecord(job_id=JOB, code="engine_oom", message="out of GPU memory"),
        final_record(finish_reason="length"),
    ],
)
def test_events_round_trip(worker, reply_key, event):
    blob = seal_event(event, reply_key, worker)
    opened = open_event(blob, reply_key, worker.verify_key_b64)
    assert opened == event
    assert type(opened) is type(event)


def test_final_record_cannot_be_sealed_unsigned():
    with pytest.raises(WireError, match="must be signed"):
        event_payload(final_record())


def test_event_for_another_reply_key_cannot_be_opened(worker, reply_key):
    blob = seal_event(final_record(), reply_key, worker)
    with pytest.raises(WireError, match="not signed by the worker"):
        open_event(blob, new_reply_keypair(), worker.verify_key_b64)


def test_final_signed_by_another_worker_is_refused(worker, reply_key):
    impostor = WorkerKeys.generate()
    blob = seal_event(final_record(), reply_key, impostor)
    with pytest.raises(WireError, match="signed"):
        open_event(blob, reply_key, worker.verify_key_b64)


def test_final_with_altered_token_counts_is_refused(worker, reply_key):
    signed = worker.signing_key.sign(canonical_json(final_record()))
    message = signed.message.replace(b'"completion_tokens":37', b'"completion_tokens":9')
    assert message != signed.message
    tampered = seal_raw(signed.signature + message, reply_key, worker)
    with pytest.raises(WireError, match="signature"):
        open_event(tampered, reply_key, worker.verify_key_b64)
    # The untouched record still opens: only the tampering is refused.
    genuine = open_event(
        seal_raw(bytes(signed), reply_key, worker), reply_key, worker.verify_key_b64
    )
    assert genuine.completion_tokens == 37


def test_unsigned_final_is_refused(worker, reply_key):
    blob = seal_raw(canonical_json(final_record()), reply_key, worker)
    with pytest.raises(WireError, match="not signed"):
        open_event(blob, reply_key, worker.verify_key_b64)


def test_signed_chunk_is_refused(worker, reply_key):
    chunk = StreamChunk(job_id=JOB, seq=0, text="hi")
    blob = seal_raw(bytes(worker.signing_key.sign(canonical_json(chunk))), reply_key, worker)
    with pytest.raises(WireError, match="unexpected signed chunk"):
        open_event(blob, reply_key, worker.verify_key_b64)


def test_unknown_event_version_is_refused(worker, reply_key):
    blob = seal_raw(b'{"v":99,"type":"chunk","job_id":"j","seq":0,"text":"x"}', reply_key, worker)
    with pytest.raises(WireError, match="unsupported wire version 99"):
        open_event(blob, reply_key, worker.verify_key_b64)


def test_unknown_signed_final_version_is_refused(worker, reply_key):
    record = json.loads(canonical_json(final_record()))
    record["v"] = 0
    payload = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
    blob = seal_raw(bytes(worker.signing_key.sign(payload)), reply_key, worker)
    with pytest.raises(WireError, match="unsupported wire version 0"):
        open_event(blob, reply_key, worker.verify_key_b64)


def test_unknown_event_type_and_extra_fields_are_refused(worker, reply_key):
    with pytest.raises(WireError, match="invalid event"):
        bonus = f'{{"v":{WIRE_VERSION},"type":"bonus","job_id":"j"}}'.encode()
        open_event(seal_raw(bonus, reply_key, worker), reply_key, worker.verify_key_b64)
    extra = f'{{"v":{WIRE_VERSION},"type":"chunk","job_id":"j","seq":0,"text":"x","price":0}}'
    with pytest.raises(WireError, match="price"):
        open_event(seal_raw(extra.encode(), reply_key, worker), reply_key, worker.verify_key_b64)


def test_event_of_another_job_is_refused_when_expected_job_given(worker, reply_key):
    blob = seal_event(final_record(job_id="other-job"), reply_key, worker)
    with pytest.raises(WireError, match="another job"):
        open_event(blob, reply_key, worker.verify_key_b64)


def test_final_record_rejects_more_cached_than_prompt_tokens():
    with pytest.raises(ValidationError, match="cached_prompt_tokens"):
        final_record(prompt_tokens=10, cached_prompt_tokens=11)


def test_bad_registered_verify_key_is_refused(worker, reply_key):
    blob = seal_event(final_record(), reply_key, worker)
    with pytest.raises(WireError, match="worker verify key"):
        open_event(blob, reply_key, "short")


# -- keys and canonical form --------------------------------------------------------------------


def test_canonical_json_is_deterministic_and_compact(reply_key):
    a = make_request(reply_key)
    b = JobRequest.model_validate(json.loads(canonical_json(a)))
    assert canonical_json(a) == canonical_json(b)
    keys = list(json.loads(canonical_json(a)))
    assert keys == sorted(keys)
    assert canonical_json(StreamChunk(job_id="j", seq=0, text="é")) == (
        f'{{"job_id":"j","seq":0,"text":"é","type":"chunk","v":{WIRE_VERSION}}}'.encode()
    )


def test_worker_keys_expose_public_halves_and_fingerprint(worker):
    assert len(base64.b64decode(worker.box_public_b64)) == 32
    assert len(base64.b64decode(worker.verify_key_b64)) == 32
    fp = worker.fingerprint()
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert fp == worker.fingerprint()
    assert fp != WorkerKeys.generate().fingerprint()
