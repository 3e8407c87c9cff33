"""The openai engine: any OpenAI-compatible server on localhost (vLLM, SGLang, llama.cpp server).

The worker node runs the server next to itself inside the TEE (``vllm serve``, ``sglang``,
``llama-server``) and this engine streams from it: ``POST {base_url}/v1/chat/completions`` with
``stream: true`` and ``stream_options.include_usage: true``, reading the server-sent events.
Closing the generator early closes the HTTP connection, which makes those servers abort the
request.

The final usage chunk is required (it is what the user pays for): a stream that ends without
one raises EngineError rather than guessing.

Pointed anywhere but a loopback address, this engine sends every decrypted prompt off the
machine (:func:`workers.evidence.off_machine_reason`): the node then runs only with the
development TEE, and the backend refuses it from attested workers. Redirects are never
followed, so a loopback server cannot pass a prompt on to another host.
"""

from __future__ import annotations

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
            "messages": openai_messages(request.messages),
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
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        pieces += 1
                        yield TextDelta(text)
                    if choice.get("finish_reason"):
                        finish_reason = choice["finish_reason"]
                if chunk.get("usage"):
                    usage = chunk["usage"]
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
