"""Request and response bodies of the OpenAI-compatible API, its error answers, and SSE framing.

Errors are OpenAI-shaped (:mod:`backend.openai_api.api_errors`, whose names this module
gives too). Streamed replies are Server-Sent Events: ``data: <json>`` lines, then ``data: [DONE]``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from backend.dispatch import TurnDone
from backend.errors import ErrorCode
from backend.openai_api.api_errors import (
    ERRORS as ERRORS,
)
from backend.openai_api.api_errors import (
    OTHER_ERROR as OTHER_ERROR,
)
from backend.openai_api.api_errors import (
    ApiError as ApiError,
)
from backend.openai_api.api_errors import (
    ErrorAnswer as ErrorAnswer,
)
from backend.openai_api.api_errors import (
    error_body as error_body,
)
from backend.openai_api.api_errors import (
    error_headers as error_headers,
)
from backend.openai_api.api_errors import (
    error_status as error_status,
)
from backend.openai_api.api_errors import (
    invalid_request as invalid_request,
)
from backend.openai_api.tool_types import MAX_TOOLS, NamedToolChoice, Tool, ToolCall
from backend.receipts import ReceiptRecord
from backend.settings import ModelPrice
from workers.registry import AttestationRecord
from workers.wire import (
    MAX_LOGIT_BIAS,
    MAX_SCHEMA_CHARS,
    MAX_TOP_LOGPROBS,
    ChatMessage,
    TokenId,
    TokenLogprob,
)
from workers.wire import ResponseFormat as WireResponseFormat

MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_STOP_SEQUENCES = 4


def checked_logit_bias(value: dict[str, float] | None) -> dict[str, float] | None:
    """A ``logit_bias`` within OpenAI's range (each bias -100..100); ValueError otherwise."""
    if value and any(not -100 <= bias <= 100 for bias in value.values()):
        raise ValueError("each bias must be between -100 and 100")
    return value


def refuse_unsupported(raw: object, refused: Mapping[str, tuple[object, ...]], path: str) -> None:
    """ApiError naming the first parameter of ``raw`` (a JSON body) whose value this server
    cannot honour on ``path`` (``refused``: each name's values that can be taken)."""
    if isinstance(raw, dict):
        for name, allowed in refused.items():
            if name in raw and raw[name] not in allowed:
                message = f"{name} is not supported by this server on {path}"
                raise ApiError(ErrorCode.INVALID_REQUEST, message, param=name)


# ------------------------------------------------------------------- requests


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCall] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_call_id: str | None = Field(default=None, max_length=128)

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        return (
            self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        )

    def to_wire(self) -> ChatMessage:
        """A system, user or assistant message as the worker gets it (a tool conversation's
        messages: :mod:`backend.openai_api.tools`)."""
        roles: dict[str, Literal["system", "user", "assistant"]] = {
            "system": "system",
            "developer": "system",
            "user": "user",
            "assistant": "assistant",
            "tool": "user",
        }
        return ChatMessage(role=roles[self.role], content=self.text)


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaSpec(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = Field(default="reply", max_length=64)
    description: str | None = Field(default=None, max_length=1024)
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """``text`` (the default), ``json_object`` (any JSON object) or ``json_schema`` (an object
    valid against the schema); the engines sample under a grammar, so the reply parses."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @field_validator("json_schema")
    @classmethod
    def _bounded(cls, spec: JsonSchemaSpec | None) -> JsonSchemaSpec | None:
        if spec is not None and len(json.dumps(spec.schema_)) > MAX_SCHEMA_CHARS:
            raise ValueError(f"the schema is over {MAX_SCHEMA_CHARS} characters of JSON")
        return spec

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema is required with type json_schema")
        return self

    def to_wire(self) -> WireResponseFormat | None:
        if self.type == "text":
            return None
        if self.type == "json_object" or self.json_schema is None:
            return WireResponseFormat(type="json_object")
        schema = json.dumps(self.json_schema.schema_, sort_keys=True)
        return WireResponseFormat(type="json_schema", json_schema=schema)


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.7, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    response_format: ResponseFormat | None = None
    logit_bias: dict[TokenId, float] | None = Field(default=None, max_length=MAX_LOGIT_BIAS)
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("top_logprobs")
    @classmethod
    def _top_with_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("logprobs must be true when top_logprobs is used")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _biases(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        return checked_logit_bias(value)

    @property
    def continues_final_message(self) -> bool:
        """An assistant message (not a tool call) last: the reply continues it (prefill)."""
        last = self.messages[-1]
        return last.role == "assistant" and not last.tool_calls

    @property
    def stop_sequences(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


# ------------------------------------------------------------------ responses


class Pricing(BaseModel):
    unit: Literal["nanoTON per 1M tokens"] = "nanoTON per 1M tokens"
    prompt: str
    cached_prompt: str
    completion: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "cocoon"
    context_length: int
    pricing: Pricing


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]

    @classmethod
    def of(cls, models: Mapping[str, ModelPrice]) -> ModelList:
        return cls(
            data=[
                ModelCard(
                    id=name,
                    context_length=price.context_length,
                    pricing=Pricing(
                        prompt=str(price.prompt),
                        cached_prompt=str(price.cached_prompt),
                        completion=str(price.completion),
                    ),
                )
                for name, price in sorted(models.items())
            ]
        )


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails

    @classmethod
    def of(cls, done: TurnDone) -> Usage:
        return cls(
            prompt_tokens=done.prompt_tokens,
            completion_tokens=done.completion_tokens,
            total_tokens=done.prompt_tokens + done.completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=done.cached_prompt_tokens),
        )


class ServedBy(BaseModel):
    """Who served the turn. Engine and image come from the backend's attestation record of the
    worker (what its evidence bound), never from the worker's own registry entry."""

    tee: str
    key_fingerprint: str
    engine: str
    engine_version: str
    image: str | None = None  # the released worker image its measurements matched
    off_machine: bool = False  # its engine sends prompts off the machine (dev TEE only)
    # Always true: a turn is billed only from usage signed by the worker's registered key (any
    # other signature fails the turn). Kept in the response for the clients that read it.
    usage_signature_verified: Literal[True] = True

    @classmethod
    def of(cls, done: TurnDone, record: AttestationRecord | None) -> ServedBy:
        worker = done.worker
        return cls(
            tee=worker.tee,
            key_fingerprint=worker.key_fingerprint,
            engine=record.engine if record else worker.engine,
            engine_version=record.engine_version if record else worker.engine_version,
            image=record.image if record else None,
            off_machine=record.off_machine if record else False,
        )


class CocoonExtra(BaseModel):
    """What OpenAI's schema has no place for: the price paid and who served the turn."""

    cost_nanoton: str
    worker: ServedBy
    # The worker's signed receipt of the turn (backend.receipts); None when it sent none.
    receipt: ReceiptRecord | None = None

    @classmethod
    def of(cls, done: TurnDone, record: AttestationRecord | None = None) -> CocoonExtra:
        return cls(
            cost_nanoton=str(done.cost), worker=ServedBy.of(done, record), receipt=done.receipt
        )


def finish_reason(done: TurnDone) -> str:
    """OpenAI knows no "cancelled": a stopped reply finished with "stop"."""
    return "stop" if done.finish_reason == "cancelled" else done.finish_reason


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChoiceLogprobs(BaseModel):
    """A choice's ``logprobs``: each token of its content, in order (``content``)."""

    content: list[TokenLogprob] | None
    refusal: None = None

    @classmethod
    def of(cls, tokens: list[TokenLogprob] | None) -> ChoiceLogprobs | None:
        return None if tokens is None else cls(content=tokens)


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    cocoon: CocoonExtra

    @classmethod
    def of(
        cls,
        completion_id: str,
        created: int,
        model: str,
        text: str,
        done: TurnDone,
        record: AttestationRecord | None = None,
        tool_calls: list[ToolCall] | None = None,
        logprobs: list[TokenLogprob] | None = None,
    ) -> ChatCompletion:
        if tool_calls:
            message = AssistantMessage(content=text.strip() or None, tool_calls=tool_calls)
            finish = "tool_calls"
        else:
            message, finish = AssistantMessage(content=text), finish_reason(done)
        return cls(
            id=completion_id,
            created=created,
            model=model,
            choices=[
                Choice(message=message, logprobs=ChoiceLogprobs.of(logprobs), finish_reason=finish)
            ],
            usage=Usage.of(done),
            cocoon=CocoonExtra.of(done, record),
        )


class ChunkChoice(BaseModel):
    index: int = 0
    delta: dict[str, Any]
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    """One streamed event. The last one (with ``include_usage``) has no choices, and the
    usage and Cocoon's extra instead."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    cocoon: CocoonExtra | None = None

    def payload(self) -> dict[str, Any]:
        exclude = {"usage", "cocoon"} if self.usage is None else None
        return self.model_dump(exclude=exclude)


class ChunkStream:
    """The chunks of one streamed completion (they share its id, time and model)."""

    def __init__(self, completion_id: str, created: int, model: str) -> None:
        self.completion_id, self.created, self.model = completion_id, created, model

    def _chunk(self, choices: list[ChunkChoice], **extra: Any) -> bytes:
        chunk = ChatCompletionChunk(
            id=self.completion_id,
            created=self.created,
            model=self.model,
            choices=choices,
            **extra,
        )
        return sse(chunk.payload())

    def delta(
        self,
        delta: dict[str, Any],
        finish: str | None = None,
        logprobs: list[TokenLogprob] | None = None,
    ) -> bytes:
        choice = ChunkChoice(
            delta=delta, logprobs=ChoiceLogprobs.of(logprobs), finish_reason=finish
        )
        return self._chunk([choice])

    def start(self) -> bytes:
        return self.delta({"role": "assistant", "content": ""})

    def text(self, text: str, logprobs: list[TokenLogprob] | None = None) -> bytes:
        return self.delta({"content": text}, logprobs=logprobs)

    def finish(self, done: TurnDone) -> bytes:
        return self.delta({}, finish_reason(done))

    def tool_calls(self, pieces: list[dict[str, Any]]) -> bytes:
        """Pieces of the reply's calls (backend.openai_api.tools.CallReader.read)."""
        return self.delta({"tool_calls": pieces})

    def called(self) -> bytes:
        """The finish of a reply that called functions."""
        return self.delta({}, "tool_calls")

    def usage(self, done: TurnDone, record: AttestationRecord | None = None) -> bytes:
        return self._chunk([], usage=Usage.of(done), cocoon=CocoonExtra.of(done, record))

    def receipt(self, done: TurnDone) -> bytes:
        """A stream's trailing event without ``include_usage``: a chunk with no choices whose
        ``cocoon`` holds only the turn's receipt (with ``include_usage`` the usage chunk has it)."""
        receipt = done.receipt.model_dump(mode="json") if done.receipt else None
        return sse(
            {
                "id": self.completion_id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": [],
                "cocoon": {"receipt": receipt},
            }
        )


def sse(payload: Mapping[str, Any]) -> bytes:
    """One Server-Sent Event carrying ``payload`` as JSON."""
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
