"""The engine interface: what the worker node needs from a model runtime.

An engine takes a chat (a list of ``{"role", "content"}`` messages) and streams the reply:
``generate()`` is an async generator that yields :class:`TextDelta` pieces and then exactly one
:class:`Usage`, always last. If the consumer stops early (``aclose()`` or a cancelled task), the
engine stops generating promptly and frees what the request held.

Everything here is plain Python: importing this module pulls in no model library.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

FinishReason = Literal["stop", "length", "cancelled"]
FINISH_REASONS: tuple[str, ...] = ("stop", "length", "cancelled")
ROLES: tuple[str, ...] = ("system", "user", "assistant", "developer", "tool")


class EngineError(RuntimeError):
    """A request the engine cannot serve (prompt too long, engine not started, server error).

    The message is meant for people: it says what went wrong and, where it can, what to do.
    """


class ContextLengthExceeded(EngineError):
    """The prompt does not fit the model's context: the client's to shorten, never retried on
    another worker (the node answers it with the error code ``context_length_exceeded``)."""


class RequestRefused(EngineError):
    """A request the engine cannot serve as asked and the client can fix (a JSON schema it
    cannot compile): the node answers it with the error code ``invalid_request``."""


@dataclass(frozen=True)
class GenerationRequest:
    """One chat completion to run.

    ``messages`` are ``{"role": ..., "content": ...}`` dicts, oldest first. ``stop`` holds extra
    stop strings (the model's own end-of-turn token always stops). ``seed`` makes sampling
    reproducible on engines that support it; ``temperature=0`` is greedy.
    """

    messages: list[dict[str, str]]
    max_tokens: int
    temperature: float = 0.7
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    #: The reply constrained to JSON: ``"json_object"`` (any object) or ``"json_schema"`` (one
    #: valid against ``json_schema``, a JSON text); None: free text.
    json_mode: Literal["json_object", "json_schema"] | None = None
    json_schema: str | None = None
    #: (token id, bias added to its logit) pairs, as OpenAI's ``logit_bias``.
    logit_bias: tuple[tuple[int, float], ...] = ()
    #: The reply continues the last message, an assistant's (prefill): no new turn is opened.
    continue_final: bool = False
    #: None: no log probabilities. N (0..20): each reply token's log probability comes back on
    #: its TextDelta, with the N likeliest alternatives; an engine that cannot raises
    #: RequestRefused.
    logprobs: int | None = None
    #: False: no chat template; the one message's content is the prompt, tokenized as it is
    #: (with the model's BOS where it takes one): the legacy text completions.
    chat_template: bool = True
    #: The functions the model may call (``{"name", "description", "parameters"}`` dicts, the
    #: parameters' JSON schema as text) and how: ``tool_choice`` "auto" or "required" (with
    #: ``tool_name``: that function only); ``parallel_tool_calls`` False: one call at most.
    #: A message may then be a ``tool`` result (``tool_call_id``) or carry an assistant's
    #: ``tool_calls`` (``{"id", "name", "arguments"}``). See :mod:`workers.engines.tools`.
    tools: tuple[dict[str, str], ...] = ()
    tool_choice: Literal["auto", "required"] = "auto"
    tool_name: str | None = None
    parallel_tool_calls: bool = True
    #: Set it to end the generation between two tokens: the engine then yields its Usage with
    #: ``finish_reason="cancelled"`` and the real counts, so what was generated can be billed.
    #: (Closing the generator also stops it, but then no Usage comes back.)
    stop_signal: threading.Event | None = field(default=None, compare=False, repr=False)

    def stop_requested(self) -> bool:
        return self.stop_signal is not None and self.stop_signal.is_set()

    def __post_init__(self) -> None:
        if not self.messages:
            raise ValueError("messages must not be empty")
        for message in self.messages:
            if not isinstance(message, dict) or not isinstance(message.get("content"), str):
                raise ValueError("each message must be a dict with a string 'content'")
            if message.get("role") not in ROLES:
                raise ValueError(
                    f"message role must be one of {ROLES}, got {message.get('role')!r}"
                )
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be between 0 and 2, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.stop, str | list):
            # A bare string would otherwise be read as a tuple of one-letter stops.
            object.__setattr__(
                self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
            )
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be between -2 and 2, got {getattr(self, name)}")
        if self.continue_final and self.messages[-1].get("role") != "assistant":
            raise ValueError("continue_final needs an assistant message last")
        if not self.chat_template and (len(self.messages) != 1 or self.continue_final):
            raise ValueError("a prompt without chat template is one message, not continued")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be between 0 and 20, got {self.logprobs}")
        if self.tool_name is not None and self.tool_choice != "required":
            raise ValueError("a named tool choice is a required one")
        if (self.json_mode == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is given with json_mode 'json_schema', and only then")


def has_images(messages: Sequence[Mapping[str, Any]]) -> bool:
    """Whether any message carries images (``"images"``: the wire's ImagePart dicts)."""
    return any(message.get("images") for message in messages)


def openai_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The messages as OpenAI's chat API takes them: a message with images has a list of
    content parts, its text first, then each ``image_url`` part."""
    out: list[dict[str, Any]] = []
    for message in messages:
        images = message.get("images")
        if images:
            parts: list[dict[str, Any]] = [{"type": "text", "text": message["content"]}]
            parts += [{"type": "image_url", "image_url": dict(i["image_url"])} for i in images]
            out.append({"role": message["role"], "content": parts})
        else:
            out.append({"role": message["role"], "content": message["content"]})
    return out


@dataclass(frozen=True)
class TopToken:
    """A token at one place of the reply: its text, UTF-8 bytes and log probability."""

    token: str
    logprob: float
    bytes: tuple[int, ...]


@dataclass(frozen=True)
class TokenLogprob(TopToken):
    """A token of the reply, its log probability and the likeliest tokens at its place."""

    top: tuple[TopToken, ...] = ()


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of the reply's call ``index``: its first piece names the function, the next
    ones carry fragments of its arguments' JSON text (OpenAI's streamed ``tool_calls``)."""

    index: int
    name: str | None = None
    arguments: str = ""


@dataclass(frozen=True)
class TextDelta:
    """A piece of the reply's text, in order; with ``GenerationRequest.logprobs``, the tokens
    generated since the last delta (its text may then be empty: part of a character); with
    tools, the pieces of calls read out of the reply, after its text."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()
    tool_calls: tuple[ToolCallDelta, ...] = ()


@dataclass(frozen=True)
class Usage:
    """Token accounting for one request; always the last item a generation yields.

    ``cached_prompt_tokens`` is the part of ``prompt_tokens`` served from the engine's prefix
    cache (0 when the engine cannot tell). ``finish_reason`` is ``"stop"`` (end of turn or a stop
    string), ``"length"`` (``max_tokens`` or the context ran out) or ``"cancelled"`` (the engine
    stopped it, e.g. while closing).
    """

    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Engine(abc.ABC):
    """A model runtime that streams chat completions.

    Lifecycle: construct (cheap, no model loaded), ``await start()`` once (loads the model),
    any number of ``generate()`` calls, possibly concurrent, then ``await close()``.
    """

    #: The engine kind: "llama-cpp", "openai", "vllm", "instant".
    name: str
    #: The model id served, as the network names it (e.g. "smollm2-135m").
    model: str
    #: The engine library's version string (part of the worker's attested claims).
    version: str
    #: How many generate() calls the engine accepts at once (the node's admission limit).
    max_concurrency: int
    #: Whether it serves requests that offer tools (the node refuses them to one that does not).
    calls_tools: bool = False
    #: Whether its chat template renders the offered tools itself (else they are written into
    #: the messages: :func:`workers.engines.tools.fallback_messages`); known after ``start()``.
    tool_template: bool = False
    #: Whether it passes a message's images on to its model (OpenAI content parts); the node
    #: refuses a request with images to an engine that does not (RequestRefused).
    reads_images: bool = False

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the model (once). Raises EngineError when it cannot."""

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[TextDelta | Usage]:
        """Stream a reply: TextDelta items, then exactly one Usage, last.

        Implementations are async generators. Closing the generator early (``aclose()``,
        cancelling the task that iterates it) stops the generation promptly.
        Raises EngineError for requests the engine cannot serve.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop in-flight generations and free the model. Safe to call twice."""

    def count_prompt_tokens(
        self, messages: list[dict[str, str]], *, chat_template: bool = True
    ) -> int | None:
        """How many tokens the prompt of ``messages`` is for this engine (its chat template and
        tokenizer), or None when the engine cannot tell without running a generation.

        The node calls it, from a thread of its own, for a turn stopped after some tokens whose
        engine did not report its usage in time: the prompt was read, so it is billed too.
        Implementations must not wait for a generation in progress. Raises EngineError.
        """
        return None

    def attested_config(self) -> dict[str, Any]:
        """Every option of this engine that changes what runs on a prompt or where it goes, as
        a JSON object: the worker's evidence binds it, the policy allow-lists it per image.

        Left out: the weights' location (their digest stands for them, see
        :meth:`weights_path`), secrets, and what only changes how much runs at once or how
        fast (threads, concurrency, memory share, timeouts).
        """
        return {}

    def weights_path(self) -> Path | None:
        """The file or model folder the engine loaded its weights from (None: it loads none
        itself). Called after ``start()``; the node hashes it for its evidence."""
        return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} model={self.model!r} version={self.version}>"
