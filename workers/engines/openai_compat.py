"""The openai engine: any OpenAI-compatible server on localhost (vLLM, SGLang, llama.cpp server).

The worker node runs the server next to itself inside the TEE (``vllm serve``, ``sglang``,
``llama-server``) and this engine streams from it: ``POST {base_url}/v1/chat/completions`` with
``stream: true`` and ``stream_options.include_usage: true``, reading the server-sent events.
Closing the generator early closes the HTTP connection, which makes those servers abort the
request.

The final usage chunk is required (it is what the user pays for): a stream that ends without
one raises EngineError rather than guessing.

Tools go to the server natively (``tools``, ``tool_choice``, ``parallel_tool_calls`` and the
tool conversation, as OpenAI's API takes them): its chat template renders them and its tool
parser reads the calls out of the reply (vLLM: ``--enable-auto-tool-choice
--tool-call-parser hermes``). The streamed ``tool_calls`` come back as the wire's call pieces,
each call whole once the server has finished it, checked and bounded as the other engines' calls
are (:class:`workers.engines.tools.ToolCallParser`: offered functions only, arguments a JSON
object within the bound, at most one call without ``parallel_tool_calls``); Hermes
``<tool_call>`` blocks in the text (a server without a tool parser) are read as calls too.

Pointed anywhere but a loopback address, this engine sends every decrypted prompt off the
machine (:func:`workers.evidence.off_machine_reason`): the node then runs only with the
development TEE, and the backend refuses it from attested workers. Redirects are never
followed, so a loopback server cannot pass a prompt on to another host.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from workers.engines.base import (
    Engine,
    EngineError,
    FinishReason,
    GenerationRequest,
    RequestRefused,
    TextDelta,
    Usage,
    openai_messages,
)
from workers.engines.tools import (
    CLOSE,
    MAX_CALL_CHARS,
    OPEN,
    template_tools,
    with_tool_calls,
)
from workers.wire_tools import MAX_TOOLS


def _aiohttp_version() -> str:
    try:
        return version("aiohttp")
    except PackageNotFoundError:  # pragma: no cover - it is imported above
        return "unknown"


class OpenAICompatEngine(Engine):
    """Streams chat completions from an OpenAI-compatible HTTP server.

    Options: ``base_url`` (required, e.g. ``http://127.0.0.1:8000``; a trailing ``/v1`` is
    accepted), ``api_key`` (sent as a Bearer token), ``served_model`` (the model name the server
    knows; defaults to ``model``), ``max_concurrency`` (default 64), ``connect_timeout`` and
    ``read_timeout`` (seconds; the read timeout applies between two chunks, so it bounds the
    time to first token of a long prompt), ``server_version`` (reported as ``version``, e.g.
    "vllm 0.11.0"; by default the version reported by the server's ``/version`` endpoint when it
    has one, else "openai-compatible"), ``weights_path`` (the GGUF file or model folder the
    server loads, inside the same TEE: the node hashes it for its evidence; without it the
    worker claims no weights digest, which no policy accepts for an attested worker).
    """

    name = "openai"
    reads_images = True  # passed on as content parts; the server's model decides
    calls_tools = True  # passed on natively; the server's template and tool parser decide

    def __init__(
        self,
        model: str,
        *,
        base_url: str,
        api_key: str | None = None,
        served_model: str | None = None,
        max_concurrency: int = 64,
        connect_timeout: float = 10.0,
        read_timeout: float = 300.0,
        server_version: str | None = None,
        weights_path: str | None = None,
    ) -> None:
        if not base_url:
            raise ValueError("the openai engine needs base_url (e.g. http://127.0.0.1:8000)")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        base = base_url.rstrip("/")
        if base.endswith("/v1"):
            base = base[: -len("/v1")]
        self.model = model
        self.base_url = base
        self.served_model = served_model or model
        self.max_concurrency = max_concurrency
        self.version = server_version or "openai-compatible"
        self._explicit_version = server_version is not None
        self._weights_path = Path(weights_path) if weights_path else None
        self._authenticated = bool(api_key)
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=read_timeout
        )
        self._session: aiohttp.ClientSession | None = None

    def attested_config(self) -> dict[str, Any]:
        """Where prompts go (``base_url``, any user:password in it masked), the model name the
        server is asked for, and whether a key is sent (never the key)."""
        parts = urlsplit(self.base_url)
        base = self.base_url
        if "@" in parts.netloc:
            host = parts.netloc.rpartition("@")[2]
            base = urlunsplit(parts._replace(netloc=f"***@{host}"))
        return {"base_url": base, "served_model": self.served_model, "api_key": self._authenticated}

    def weights_path(self) -> Path | None:
        return self._weights_path

    @property
    def completions_url(self) -> str:
        return f"{self.base_url}/v1/chat/completions"

    async def start(self) -> None:
        if self._session is not None:
            return
        session = aiohttp.ClientSession(
            headers=self._headers,
            timeout=self._timeout,
            connector=aiohttp.TCPConnector(limit=self.max_concurrency),
        )
        try:
            await self._check_server(session)
        except BaseException:
            await session.close()
            raise
        self._session = session

    async def _check_server(self, session: aiohttp.ClientSession) -> None:
        """Fail early when nothing answers at base_url; learn the server's version if it says.

        The model name is not checked here: servers differ in what ``/v1/models`` lists (the
        llama.cpp server lists a file path), and a wrong name fails clearly on the first request.
        """
        try:
            async with session.get(f"{self.base_url}/v1/models", allow_redirects=False) as response:
                await response.read()
                if response.status in (401, 403):
                    raise EngineError(
                        f"the server at {self.base_url} refused the API key "
                        f"(HTTP {response.status}); set api_key"
                    )
            if not self._explicit_version:
                async with session.get(
                    f"{self.base_url}/version", allow_redirects=False
                ) as response:
                    if response.status == 200:
                        body = await response.json(content_type=None)
                        if isinstance(body, dict) and body.get("version"):
                            self.version = str(body["version"])
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            raise EngineError(
                f"cannot reach the OpenAI-compatible server at {self.base_url}: {error}"
            ) from error

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _payload(self, request: GenerationRequest) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.served_model,
            "messages": _upstream_messages(request.messages),
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.stop:
            payload["stop"] = list(request.stop)
        if request.seed is not None:
            payload["seed"] = request.seed
        if request.presence_penalty:
            payload["presence_penalty"] = request.presence_penalty
        if request.frequency_penalty:
            payload["frequency_penalty"] = request.frequency_penalty
        if request.continue_final:  # vLLM's server extension (others refuse it: a 400)
            payload["continue_final_message"] = True
            payload["add_generation_prompt"] = False
        if request.logit_bias:
            payload["logit_bias"] = {str(token): bias for token, bias in request.logit_bias}
        if request.tools:
            payload["tools"] = template_tools(request)
            payload["tool_choice"] = (
                {"type": "function", "function": {"name": request.tool_name}}
                if request.tool_name is not None
                else request.tool_choice
            )
            payload["parallel_tool_calls"] = request.parallel_tool_calls
        if request.json_mode == "json_object":
            payload["response_format"] = {"type": "json_object"}
        elif request.json_schema is not None:
            schema = json.loads(request.json_schema)
            payload["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "reply", "schema": schema},
            }
        return payload

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TextDelta | Usage]:
        if not request.tools:
            async with aclosing(self._generate(request, None)) as items:
                async for item in items:
                    yield item
            return
        # The server forces a required call itself: its calls come back as Hermes blocks in
        # the text, read out as in free text, of the function it was to call only.
        allowed = tuple(t for t in request.tools if request.tool_name in (None, t["name"]))
        reading = dataclasses.replace(request, tools=allowed, tool_choice="auto", tool_name=None)
        replies = with_tool_calls(reading, self._generate(request, _NativeCalls()))
        async with aclosing(replies) as items:  # type: ignore[type-var]
            async for item in items:
                yield item

    async def _generate(
        self, request: GenerationRequest, calls: _NativeCalls | None
    ) -> AsyncGenerator[TextDelta | Usage, None]:
        """The server's reply as text; with ``calls``, each of its finished tool calls as the
        text of a Hermes block, in the reply's order (read out by ``generate``'s parser)."""
        if self._session is None:
            raise EngineError("the openai engine is not started (await engine.start() first)")
        if request.logprobs is not None:  # not asked of its server yet
            raise RequestRefused("logprobs: not available from this worker's engine (openai)")
        if not request.chat_template:  # its server's chat endpoint templates every prompt
            raise RequestRefused("a prompt without chat template: not available from this engine")
        finish_reason: str | None = None
        usage: dict[str, Any] | None = None
        pieces = 0
        async with aclosing(self._chunks(self._session, self._payload(request))) as chunks:
            async for chunk in chunks:
                if request.stop_requested():
                    break  # closing the response makes the server stop
                for choice in chunk.get("choices") or ():
                    delta = choice.get("delta") or {}
                    text = delta.get("content")
                    if text and isinstance(text, str):
                        pieces += 1
                        if calls is not None and (finished := calls.finish()):
                            yield TextDelta(finished)
                        yield TextDelta(text)
                    if calls is not None and delta.get("tool_calls"):
                        pieces += 1
                        if finished := calls.add(delta["tool_calls"]):
                            yield TextDelta(finished)
                    if choice.get("finish_reason"):
                        finish_reason = choice["finish_reason"]
                if chunk.get("usage"):
                    usage = chunk["usage"]
        if calls is not None and (finished := calls.finish()):
            yield TextDelta(finished)
        if usage is None and request.stop_requested():
            # The server reports no usage for a request cut short: count the pieces received
            # (one token each, near enough) and nothing for the prompt: never more than used.
            yield Usage(0, 0, pieces, "cancelled")
            return
        if usage is None:
            raise EngineError(
                f"the server at {self.base_url} sent no usage; it must support "
                "stream_options.include_usage"
            )
        details = usage.get("prompt_tokens_details") or {}
        yield Usage(
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            cached_prompt_tokens=int(details.get("cached_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            finish_reason=_finish_reason(finish_reason),
        )

    async def _chunks(
        self, session: aiohttp.ClientSession, payload: dict[str, Any]
    ) -> AsyncGenerator[dict[str, Any], None]:
        """POST the request and yield the stream's JSON chunks until ``[DONE]``."""
        completed = False
        try:
            async with session.post(
                self.completions_url, json=payload, allow_redirects=False
            ) as response:
                if response.status != 200:
                    raise EngineError(await _error_message(response))
                try:
                    async with aclosing(_sse_data(response)) as events:
                        async for data in events:
                            if data == "[DONE]":
                                break
                            chunk = json.loads(data)
                            if not isinstance(chunk, dict):
                                raise EngineError(f"the server sent an odd chunk: {data[:200]}")
                            if "error" in chunk:
                                raise EngineError(f"the server failed mid-stream: {chunk['error']}")
                            yield chunk
                    completed = True
                finally:
                    if not completed:
                        # Early exit: drop the connection, so the server aborts the request.
                        response.close()
        except (aiohttp.ClientError, TimeoutError) as error:
            raise EngineError(
                f"the OpenAI-compatible server at {self.base_url}: {error}"
            ) from error
        except json.JSONDecodeError as error:
            raise EngineError(f"the server sent a malformed stream chunk: {error}") from error


def _upstream_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages as OpenAI's chat API takes them, with the tool conversation: an assistant's
    ``tool_calls`` (arguments as JSON text) and a tool message's ``tool_call_id``."""
    out = openai_messages(messages)
    for message, item in zip(messages, out, strict=True):
        if message.get("tool_calls"):
            item["tool_calls"] = [
                {
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": call["name"], "arguments": call["arguments"]},
                }
                for call in message["tool_calls"]
            ]
        if message.get("tool_call_id"):
            item["tool_call_id"] = message["tool_call_id"]
    return out


class _NativeCalls:
    """The server's streamed ``tool_calls`` put together, each call by its ``index``, and given
    back, once finished (a later call begins, or text follows, or the reply ends), as the text
    of a Hermes block. Bounded: at most :data:`MAX_TOOLS` calls kept, a call's text at most
    :data:`MAX_CALL_CHARS` (a longer one is dropped), so a server cannot make the node hold
    more. The name is the first one given (some servers repeat it in every piece)."""

    def __init__(self) -> None:
        self._open: dict[int, tuple[str | None, list[str], int]] = {}
        self._seen = 0
        self._last: int | None = None

    def add(self, deltas: Any) -> str:
        """Take a delta's ``tool_calls`` in; the blocks of the calls they finish."""
        finished: list[str] = []
        for delta in deltas if isinstance(deltas, list) else ():
            index = delta.get("index") if isinstance(delta, dict) else None
            if not isinstance(index, int) or isinstance(index, bool):
                continue
            if index != self._last:  # a call begins: the ones before it are finished
                finished.append(self.finish())
                if self._seen >= MAX_TOOLS:
                    continue
                self._open[index] = (None, [], 0)
                self._last, self._seen = index, self._seen + 1
            name, arguments, size = self._open[index]
            function = delta.get("function")
            if not isinstance(function, dict):
                continue
            if name is None and isinstance(function.get("name"), str) and function["name"]:
                name = function["name"]
            fragment = function.get("arguments")
            if isinstance(fragment, str) and fragment and size <= MAX_CALL_CHARS:
                size += len(fragment)
                arguments.append(fragment[: MAX_CALL_CHARS + 1])
            self._open[index] = (name, arguments, size)
        return "".join(finished)

    def finish(self) -> str:
        """The blocks of the calls not given back yet."""
        blocks: list[str] = []
        for name, arguments, size in self._open.values():
            if name is None or size > MAX_CALL_CHARS:
                continue  # a call without a name, or past the bound: not a call
            text = "".join(arguments) or "{}"
            try:
                value: Any = json.loads(text)
            except ValueError:
                value = text  # given back as text by the parser, as a malformed block is
            body = json.dumps({"name": name, "arguments": value}, ensure_ascii=False)
            blocks.append(f"{OPEN}\n{body}\n{CLOSE}")
        self._open.clear()
        self._last = None
        return "".join(blocks)


def _finish_reason(reason: str | None) -> FinishReason:
    if reason == "length":
        return "length"
    if reason in ("abort", "cancelled"):
        return "cancelled"
    return "stop"  # "stop", "eos", "tool_calls", "content_filter", or none given


async def _sse_data(response: aiohttp.ClientResponse) -> AsyncGenerator[str, None]:
    """The ``data`` field of each server-sent event (multi-line data joined by newlines)."""
    lines: list[str] = []
    buffer = b""
    async for piece in response.content.iter_any():
        buffer += piece
        while True:
            end = buffer.find(b"\n")
            if end == -1:
                break
            line = buffer[:end].rstrip(b"\r").decode("utf-8")
            buffer = buffer[end + 1 :]
            if not line:
                if lines:
                    yield "\n".join(lines)
                    lines = []
            elif line.startswith("data:"):
                value = line[5:]
                lines.append(value[1:] if value.startswith(" ") else value)
            # comments (":"), "event:", "id:" and "retry:" lines carry nothing we need
    if lines:
        yield "\n".join(lines)


async def _error_message(response: aiohttp.ClientResponse) -> str:
    text = (await response.text(errors="replace"))[:500]
    try:
        body = json.loads(text)
        error = body.get("error", body) if isinstance(body, dict) else body
        detail = error.get("message", error) if isinstance(error, dict) else error
    except ValueError:
        detail = text
    return f"the server at {response.url} answered {response.status}: {detail}"
