"""What the OpenAI-compatible API does, apart from HTTP: who the key belongs to, and a chat
completion as a turn of the :class:`~backend.dispatch.Dispatcher` (the same holds and billing as
every other client)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import NamedTuple

import redis

from backend.apikeys import user_for_key
from backend.db import Database
from backend.dispatch import Dispatcher, Turn, TurnDone, TurnRequest, TurnText
from backend.errors import ErrorCode
from backend.openai_api import tools
from backend.openai_api.protocol import ApiError, ChatCompletionRequest, ModelList
from backend.settings import Settings
from workers import registry
from workers.wire import ChatMessage, SamplingParams, TokenLogprob

NO_KEY = "missing API key: send 'Authorization: Bearer <key>' (get one from the bot's /apikey)"
BAD_KEY = "invalid or revoked API key"


def conversation_id_for(user_id: int, messages: Sequence[ChatMessage]) -> str:
    """Turns of one API conversation share their opening messages: route them to one worker so
    its prefix cache hits. Bound to the user, so nothing is shared across users."""
    digest = hashlib.sha256(str(user_id).encode())
    for message in messages[:2]:
        digest.update(b"\0" + message.role.encode() + b"\0" + message.content.encode())
    return "api-" + digest.hexdigest()[:32]


def bearer_key(authorization: str | None) -> str:
    """The key of an ``Authorization: Bearer <key>`` header; ApiError if there is none."""
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise ApiError(ErrorCode.INVALID_API_KEY, NO_KEY)
    return key.strip()


class Reply(NamedTuple):
    """A whole reply: its text, how the turn ended, its tokens' log probabilities (None when
    the request asked for none)."""

    text: str
    done: TurnDone
    logprobs: list[TokenLogprob] | None


class OpenAIService:
    """One per request: plain references to the process's services."""

    def __init__(self, settings: Settings, db: Database, dispatcher: Dispatcher) -> None:
        self.settings = settings
        self.db = db
        self.dispatcher = dispatcher

    async def authenticate(self, authorization: str | None) -> int:
        """The user of the ``Authorization: Bearer <key>`` header; ApiError if there is none."""
        user_id = await user_for_key(self.db, bearer_key(authorization))
        if user_id is None:
            raise ApiError(ErrorCode.INVALID_API_KEY, BAD_KEY)
        return user_id

    def models(self) -> ModelList:
        return ModelList.of(self.settings.models)

    async def start(self, user_id: int, body: ChatCompletionRequest) -> Turn:
        """Hold and dispatch the turn; TurnError when it cannot start (nothing is held then).
        Without ``max_tokens`` the dispatcher applies the default of every chat turn."""
        messages = tools.prompt(body)  # a tool conversation written out (tools.py)
        return await self.dispatcher.start_turn(
            TurnRequest(
                user_id=user_id,
                model=body.model,
                messages=messages,
                max_tokens=body.max_completion_tokens or body.max_tokens,
                sampling=SamplingParams(
                    temperature=body.temperature,
                    top_p=body.top_p,
                    stop=body.stop_sequences,
                    seed=body.seed,
                    presence_penalty=body.presence_penalty,
                    frequency_penalty=body.frequency_penalty,
                    response_format=tools.response_format(body),
                    logit_bias=body.logit_bias or {},
                    # An assistant message last is continued (prefill), as vLLM's server does.
                    continue_final_message=body.continues_final_message,
                    logprobs=body.logprobs,
                    top_logprobs=body.top_logprobs or 0,
                ),
                conversation_id=conversation_id_for(user_id, messages),
                tools=tools.wire_tools(body),
            )
        )

    async def attestation(self, done: TurnDone) -> registry.AttestationRecord | None:
        """The backend's record of the worker that served ``done`` (what the receipt shows of
        it), or None when it has expired or cannot be read now."""
        try:
            return await registry.read_attestation(self.dispatcher.redis, done.worker.worker_id)
        except (redis.RedisError, ValueError):
            return None

    @staticmethod
    async def collect(turn: Turn, calls: tools.CallReader | None = None) -> Reply:
        """The whole reply of a turn that is not streamed; TurnError if it fails. Its tool
        calls (checked by the turn: backend.tool_checks) go to ``calls``."""
        parts: list[str] = []
        logprobs: list[TokenLogprob] = []
        done: TurnDone | None = None
        async for event in turn.events():
            if isinstance(event, TurnText):
                parts.append(event.text)
                logprobs += event.logprobs
                if calls is not None:
                    for piece in event.tool_calls:
                        calls.read(piece)
            else:
                done = event
        assert done is not None  # events() ends with TurnDone or raises
        asked = turn.request.sampling.logprobs
        return Reply("".join(parts), done, logprobs if asked else None)
