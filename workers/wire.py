"""The wire contract between the backend and the worker: schemas, sealing and signing.

Both sides import this module, so it stays light: stdlib, pydantic v2 and PyNaCl only.

* A :class:`JobRequest` is sealed (libsodium sealed box) to the worker's attested X25519 key.
* Each reply event is sealed under a per-job stream key agreed with the per-job reply key
  carried inside the request (:mod:`workers.stream_crypto`).
* A :class:`FinalRecord` (token usage, the basis of billing) is also signed with the worker's
  Ed25519 key: the plaintext in the box is ``signature || canonical JSON``.

Every malformed, wrong-version, undecryptable or badly signed payload raises :class:`WireError`.
Error messages never quote payload contents, so they are safe to log.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

import nacl.exceptions
import nacl.public
import nacl.signing
from pydantic import (
    BaseModel,
    Field,
    SerializerFunctionWrapHandler,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from workers.wire_tools import MAX_TOOLS, TOOL_CALL_ID, ToolCall, ToolCallDelta, Tools
from workers.wire_tools import WireModel as _Wire  # every model of the wire is one
from workers.wire_tools import drop_none as _drop_none

WIRE_VERSION = 2
"""2: each stream entry is an AEAD under a per-job key (:mod:`workers.stream_crypto`)."""

MAX_CONTENT_CHARS = 1_000_000  # one message, or one stream chunk
MAX_MESSAGES = 512
MAX_TOTAL_CHARS = 8_000_000  # all messages of one request together
MAX_SEALED_BYTES = 64 * 1024 * 1024  # refused before decryption
_SIGNATURE_BYTES = 64

JobId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class WireError(ValueError):
    """A payload that is malformed, of another wire version, undecryptable or badly signed."""


class _Versioned(_Wire):
    v: int = WIRE_VERSION

    @field_validator("v")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != WIRE_VERSION:
            raise ValueError(f"unsupported wire version {v}")
        return v


MAX_IMAGES = 4
"""The most images one request may carry, all its messages together."""
MAX_IMAGE_BYTES = 5 * 1024 * 1024
"""The largest image, decoded."""
_IMAGE_PREFIX = "data:image/webp;base64,"  # the longest of the accepted prefixes
MAX_IMAGE_URL_CHARS = len(_IMAGE_PREFIX) + 4 * ((MAX_IMAGE_BYTES + 2) // 3)
IMAGE_URL = r"^data:image/(jpeg|png|webp|gif);base64,[A-Za-z0-9+/]+={0,2}$"
"""An image travels inside the sealed request as a data URL, never as a link to fetch."""


class ImageUrl(_Wire):
    url: str = Field(max_length=MAX_IMAGE_URL_CHARS, pattern=IMAGE_URL)


class ImagePart(_Wire):
    """An image of a user message, as OpenAI's chat content part of type ``image_url``."""

    type: Literal["image_url"] = "image_url"
    image_url: ImageUrl


class ChatMessage(_Wire):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = Field(max_length=MAX_CONTENT_CHARS)
    # The images a user's message shows (to a model that reads images), after its text.
    images: list[ImagePart] | None = Field(default=None, min_length=1, max_length=MAX_IMAGES)
    # An assistant's calls of the request's tools; a tool message answers the call it names.
    tool_calls: list[ToolCall] | None = Field(default=None, min_length=1, max_length=MAX_TOOLS)
    tool_call_id: str | None = Field(default=None, pattern=TOOL_CALL_ID)

    @model_validator(mode="after")
    def _images_are_a_users(self) -> ChatMessage:
        if self.images and self.role != "user":
            raise ValueError("only a user message carries images")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only an assistant message carries tool_calls")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("a tool message names its tool_call_id, and only it")
        return self

    @model_serializer(mode="wrap")
    def _images_only_when_given(self, handler: SerializerFunctionWrapHandler) -> Any:
        """A message without images or tool calls is written as before they existed."""
        return _drop_none(handler(self), "images", "tool_calls", "tool_call_id")


MAX_SCHEMA_CHARS = 32_768
"""The longest JSON schema a request may constrain its reply with (its canonical JSON text)."""


MAX_LOGIT_BIAS = 300
"""The most tokens one request may bias (OpenAI's own limit)."""

TokenId = Annotated[str, Field(pattern=r"^[0-9]{1,9}$")]

MAX_TOP_LOGPROBS = 20
"""The most alternatives a token's log probability may come with (OpenAI's own limit)."""

MAX_LOGPROBS_PER_CHUNK = 64
"""The most tokens one stream chunk may carry log probabilities of (the node splits more)."""

MAX_TOKEN_CHARS = 64
"""The longest text, and most UTF-8 bytes, of one token in a log probability (the node cuts
longer ones)."""

MIN_LOGPROB = -9999.0
"""The lowest log probability on the wire: an impossible token (-inf) is sent as this, as
OpenAI does."""

Logprob = Annotated[float, Field(ge=MIN_LOGPROB, le=0.0, allow_inf_nan=False)]
TokenBytes = Annotated[list[Annotated[int, Field(ge=0, le=255)]], Field(max_length=MAX_TOKEN_CHARS)]


class TopLogprob(_Wire):
    """One of the likeliest tokens at a place of the reply: its text, UTF-8 bytes (a token
    may hold part of a character) and log probability."""

    token: str = Field(max_length=MAX_TOKEN_CHARS)
    logprob: Logprob
    bytes: TokenBytes


class TokenLogprob(TopLogprob):
    """A token of the reply with its log probability and the likeliest alternatives."""

    top_logprobs: list[TopLogprob] = Field(default_factory=list, max_length=MAX_TOP_LOGPROBS)


class ResponseFormat(_Wire):
    """The reply constrained to JSON: any JSON object, or one valid against ``json_schema``
    (the schema's JSON text; the engine compiles it to a grammar or structured-output spec)."""

    type: Literal["json_object", "json_schema"]
    json_schema: str | None = Field(default=None, min_length=2, max_length=MAX_SCHEMA_CHARS)

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is given with type json_schema, and only then")
        return self


class SamplingParams(_Wire):
    temperature: float = Field(default=0.7, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    stop: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(
        default_factory=list, max_length=4
    )
    seed: int | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    response_format: ResponseFormat | None = None
    # Token id (decimal) -> bias added to its logit, as OpenAI's logit_bias.
    logit_bias: dict[TokenId, Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]] = (
        Field(default_factory=dict, max_length=MAX_LOGIT_BIAS)
    )
    # The reply continues the last message, an assistant's (prefill), instead of a new turn.
    continue_final_message: bool = False
    # Each reply token's log probability comes back (StreamChunk.logprobs), with the
    # ``top_logprobs`` likeliest alternatives at its place (OpenAI's logprobs / top_logprobs).
    logprobs: bool = False
    top_logprobs: int = Field(default=0, ge=0, le=MAX_TOP_LOGPROBS)
    # False: the engine applies no chat template; the request's one user message is the prompt
    # itself, tokenized as it is (the legacy text completions).
    chat_template: bool = True

    @model_validator(mode="after")
    def _top_with_logprobs(self) -> SamplingParams:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs")
        return self


class JobRequest(_Versioned):
    job_id: JobId
    model: str = Field(min_length=1, max_length=200)
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    max_tokens: int = Field(ge=1, le=1_000_000)
    reply_key: str
    conversation_id: str | None = Field(default=None, min_length=1, max_length=128)
    # The functions the model may call (through its chat template; see workers.engines.tools).
    tools: Tools | None = None

    @model_serializer(mode="wrap")
    def _tools_only_when_given(self, handler: SerializerFunctionWrapHandler) -> Any:
        return _drop_none(handler(self), "tools")

    @field_validator("reply_key")
    @classmethod
    def _valid_reply_key(cls, value: str) -> str:
        public_key(value, "reply_key")
        return value

    @model_validator(mode="after")
    def _continues_an_assistant(self) -> JobRequest:
        if self.sampling.continue_final_message and self.messages[-1].role != "assistant":
            raise ValueError("continue_final_message needs an assistant message last")
        return self

    @model_validator(mode="after")
    def _raw_prompt_alone(self) -> JobRequest:
        if not self.sampling.chat_template and (
            len(self.messages) != 1
            or self.messages[0].role != "user"
            or self.sampling.continue_final_message
        ):
            raise ValueError("a prompt without chat template is one user message")
        return self

    @model_validator(mode="after")
    def _bounded_total(self) -> JobRequest:
        calls = (c for m in self.messages for c in m.tool_calls or ())
        if (
            sum(len(m.content) for m in self.messages) + sum(len(c.arguments) for c in calls)
            > MAX_TOTAL_CHARS
        ):
            raise ValueError(f"messages exceed {MAX_TOTAL_CHARS} characters in total")
        if sum(len(m.images or ()) for m in self.messages) > MAX_IMAGES:
            raise ValueError(f"a request carries at most {MAX_IMAGES} images")
        return self


class StreamChunk(_Versioned):
    type: Literal["chunk"] = "chunk"
    job_id: JobId
    seq: int = Field(ge=0)
    text: str = Field(max_length=MAX_CONTENT_CHARS)
    # The log probabilities of this chunk's tokens, when the request asked for them.
    logprobs: list[TokenLogprob] | None = Field(default=None, max_length=MAX_LOGPROBS_PER_CHUNK)
    # Pieces of the reply's tool calls, when the request offered tools (after ``text``).
    tool_calls: list[ToolCallDelta] | None = Field(default=None, min_length=1, max_length=MAX_TOOLS)

    @model_serializer(mode="wrap")
    def _logprobs_only_when_given(self, handler: SerializerFunctionWrapHandler) -> Any:
        """A chunk without log probabilities or tool calls is written as before they existed."""
        return _drop_none(handler(self), "logprobs", "tool_calls")

    def reply_text(self) -> str:
        """What the chunk delivers, as the receipt's reply digest and the billing bound take
        it: its text, then each tool call piece's name and arguments."""
        calls = self.tool_calls or []
        return self.text + "".join((c.name or "") + c.arguments for c in calls)


class FinalRecord(_Versioned):
    type: Literal["final"] = "final"
    job_id: JobId
    prompt_tokens: int = Field(ge=0)
    cached_prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    finish_reason: Literal["stop", "length", "cancelled"]

    @model_validator(mode="after")
    def _cached_within_prompt(self) -> FinalRecord:
        if self.cached_prompt_tokens > self.prompt_tokens:
            raise ValueError("cached_prompt_tokens exceeds prompt_tokens")
        return self


CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
"""An :class:`ErrorRecord`'s code when the prompt does not fit the model's context: the
client's to fix (a 400 for API clients), never retried on another worker."""

INVALID_REQUEST = "invalid_request"
"""An :class:`ErrorRecord`'s code for a request the engine refuses as the client's to fix (a
JSON schema it cannot compile): a 400 for API clients, never retried on another worker."""


class ErrorRecord(_Versioned):
    type: Literal["error"] = "error"
    job_id: JobId
    code: str = Field(min_length=1, max_length=64)
    message: str = Field(max_length=4096)


Event = Annotated[StreamChunk | FinalRecord | ErrorRecord, Field(discriminator="type")]
_T = TypeVar("_T")
_EVENT: TypeAdapter[Event] = TypeAdapter(Event)
_REQUEST: TypeAdapter[JobRequest] = TypeAdapter(JobRequest)


@dataclass(frozen=True)
class WorkerKeys:
    """The worker's long-lived identity, created inside the TEE at start."""

    box_key: nacl.public.PrivateKey
    signing_key: nacl.signing.SigningKey

    @classmethod
    def generate(cls) -> WorkerKeys:
        return cls(nacl.public.PrivateKey.generate(), nacl.signing.SigningKey.generate())

    @property
    def box_public_b64(self) -> str:
        return public_b64(self.box_key)

    @property
    def verify_key_b64(self) -> str:
        return base64.b64encode(bytes(self.signing_key.verify_key)).decode("ascii")

    def fingerprint(self) -> str:
        """First 16 hex characters of sha256(box public key || verify key), for display."""
        return key_fingerprint(self.box_public_b64, self.verify_key_b64)


def key_fingerprint(box_public_b64: str, verify_key_b64: str) -> str:
    """A worker's short fingerprint from its public keys, as the client shows it."""
    raw = key_bytes(box_public_b64, "box public key") + key_bytes(verify_key_b64, "verify key")
    return hashlib.sha256(raw).hexdigest()[:16]


def new_reply_keypair() -> nacl.public.PrivateKey:
    """A fresh per-job reply key; its public half goes into ``JobRequest.reply_key``."""
    return nacl.public.PrivateKey.generate()


def public_b64(key: nacl.public.PrivateKey) -> str:
    """Base64 of the 32-byte X25519 public key of ``key``."""
    return base64.b64encode(bytes(key.public_key)).decode("ascii")


def canonical_json(model: BaseModel) -> bytes:
    """Deterministic UTF-8 JSON of ``model``: sorted keys, no spaces."""
    text = json.dumps(
        model.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise WireError("text is not valid unicode (lone surrogate)") from error


def seal_request(req: JobRequest, worker_box_public_b64: str) -> bytes:
    """Seal ``req`` to the worker's X25519 public key (only that worker can open it)."""
    box = nacl.public.SealedBox(public_key(worker_box_public_b64, "worker box key"))
    return box.encrypt(canonical_json(req))


def open_request(blob: bytes, keys: WorkerKeys) -> JobRequest:
    """Decrypt and validate a sealed request with the worker's private box key."""
    data = _loads_checked(_unseal(blob, keys.box_key, "request"), "request")
    return _validate(_REQUEST, data, "request")


def event_payload(event: Event, keys: WorkerKeys | None = None) -> bytes:
    """The plaintext of a reply event (:mod:`workers.stream_crypto` seals it): its canonical
    JSON, and for a final record ``signature || JSON`` signed with ``keys``."""
    payload = canonical_json(event)
    if isinstance(event, FinalRecord):
        if keys is None:
            raise WireError("a final record must be signed: the worker's keys are required")
        payload = keys.signing_key.sign(payload)  # signature || message
    return payload


def event_from_payload(
    plaintext: bytes, worker_verify_key_b64: str, *, expected_job_id: str | None = None
) -> Event:
    """The reply event of an opened entry; a final record must carry a valid signature of the
    worker's key. With ``expected_job_id``, an event of another job is refused too."""
    try:
        data: Any = _loads(plaintext)
        signed = False
    except ValueError:  # not plain JSON: must be signature || JSON
        data = _loads_checked(_verify(plaintext, worker_verify_key_b64), "final record")
        signed = True
    else:
        data = _loads_checked(plaintext, "event", data)
    event = _validate(_EVENT, data, "event")
    if isinstance(event, FinalRecord) and not signed:
        raise WireError("final record is not signed by the worker")
    if signed and not isinstance(event, FinalRecord):
        raise WireError(f"unexpected signed {event.type} event")
    if expected_job_id is not None and event.job_id != expected_job_id:
        raise WireError("event belongs to another job")
    return event


def public_key(value: str, what: str) -> nacl.public.PublicKey:
    """The X25519 public key of base64 ``value`` (:class:`WireError` naming ``what`` if not)."""
    return nacl.public.PublicKey(key_bytes(value, what))


def key_bytes(value: object, what: str) -> bytes:
    """The 32 bytes of a base64 key (:class:`WireError` naming ``what`` if it is not one)."""
    if not isinstance(value, str):
        raise WireError(f"{what} must be a base64 string")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as error:
        raise WireError(f"{what} is not valid base64") from error
    if len(raw) != 32:
        raise WireError(f"{what} must be 32 bytes, got {len(raw)}")
    return raw


# -- internals --------------------------------------------------------------------------------


def _unseal(blob: bytes, key: nacl.public.PrivateKey, what: str) -> bytes:
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise WireError(f"sealed {what} must be bytes")
    if len(blob) > MAX_SEALED_BYTES:
        raise WireError(f"sealed {what} is too large ({len(blob)} bytes)")
    try:
        return nacl.public.SealedBox(key).decrypt(bytes(blob))
    except nacl.exceptions.CryptoError as error:
        raise WireError(f"cannot decrypt {what}: not sealed to this key, or corrupted") from error


def _verify(signed: bytes, verify_key_b64: str) -> bytes:
    verify_key = nacl.signing.VerifyKey(key_bytes(verify_key_b64, "worker verify key"))
    if len(signed) <= _SIGNATURE_BYTES:
        raise WireError("malformed event: neither JSON nor a signed record")
    try:
        return verify_key.verify(signed)
    except nacl.exceptions.BadSignatureError as error:
        raise WireError("final record signature does not match the worker's key") from error


def _loads(raw: bytes) -> Any:
    """Strict JSON: UTF-8 only, no NaN/Infinity. Raises ValueError."""
    return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)


def _loads_checked(raw: bytes, what: str, data: Any = None) -> dict[str, Any]:
    """Parse (unless ``data`` is given) and check it is an object of this wire version."""
    if data is None:
        try:
            data = _loads(raw)
        except ValueError as error:  # includes UnicodeDecodeError and JSONDecodeError
            raise WireError(f"malformed {what}: not valid UTF-8 JSON") from error
    if not isinstance(data, dict):
        raise WireError(f"malformed {what}: not a JSON object")
    _check_version(data)
    return data


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _check_version(data: dict[str, Any]) -> None:
    if "v" not in data:
        raise WireError("missing wire version")
    v = data["v"]
    if type(v) is not int or v != WIRE_VERSION:
        raise WireError(f"unsupported wire version {str(v)[:20]}")


def _validate(adapter: TypeAdapter[_T], data: dict[str, Any], what: str) -> _T:
    try:
        return adapter.validate_python(data)
    except ValidationError as error:
        problems = [
            f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}"
            for e in error.errors(include_input=False, include_url=False)[:3]
        ]
        raise WireError(f"invalid {what}: " + "; ".join(problems)) from None
