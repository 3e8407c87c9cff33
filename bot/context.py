"""Chat context at rest: the last messages of each chat, sealed with the operator's key.

The blob in Redis is XChaCha20-Poly1305 (libsodium AEAD, through PyNaCl) over JSON, with the
chat id as associated data (a blob copied to another chat's key does not open), and a TTL.
Nothing else about a conversation is stored: no plaintext, no hashes of it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

import nacl.bindings as sodium
import nacl.exceptions
import nacl.utils
from redis.asyncio import Redis as AsyncRedis

from backend import serverkeys
from backend.dispatch import WorkerProof, prompt_token_bound
from backend.settings import Settings
from workers.redis_keys import redis_key
from workers.wire import ChatMessage

if TYPE_CHECKING:
    from bot.groups import Place

log = logging.getLogger("cocoon.bot.context")

KEY_BYTES = sodium.crypto_aead_xchacha20poly1305_ietf_KEYBYTES
NONCE_BYTES = sodium.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES
CONTEXT = "bot:ctx"
VERSION = b"\x01"


def load_context_key(settings: Settings) -> bytes:
    """The operator's context key: the setting, else one generated once in the secrets
    directory, outside the data directory (:func:`backend.serverkeys.load_context_key`)."""
    return serverkeys.load_context_key(settings)


@dataclass
class LastTurn:
    """What /privacy shows about the last reply (no text)."""

    turn_id: str
    model: str
    worker: WorkerProof


@dataclass
class Conversation:
    messages: list[dict[str, str]] = field(default_factory=list)
    last: LastTurn | None = None
    conversation_id: str = ""
    pending: str = ""  # a question refused for balance, offered again after a top-up
    system: str = ""  # the place's system prompt (/system)

    def chat_messages(self) -> list[ChatMessage]:
        """The messages a turn sends: the system prompt (when set), then the history."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [_chat_message(m) for m in [*system, *self.messages]]

    def without_asker(self, telegram_id: int) -> bool:
        """Drop one member's questions and the answers to them from a topic's shared context
        (each kept message names its asker: ``by``); whether any were there."""
        kept = [m for m in self.messages if m.get("by") != str(telegram_id)]
        dropped = len(kept) != len(self.messages)
        self.messages = kept
        return dropped


def _chat_message(message: dict[str, str]) -> ChatMessage:
    """A kept message as a turn sends it (without its asker)."""
    return ChatMessage.model_validate({"role": message["role"], "content": message["content"]})


def trim(
    messages: list[dict[str, str]], *, budget_tokens: int, max_messages: int
) -> list[dict[str, str]]:
    """The newest messages that fit the model's budget (an upper bound of their tokens) and the
    count limit; the first kept message is a user's."""
    kept: list[dict[str, str]] = []
    for message in reversed(messages):
        candidate = [message, *kept]
        if len(candidate) > max_messages:
            break
        if kept and prompt_token_bound([_chat_message(m) for m in candidate]) > budget_tokens:
            break
        kept = candidate
    while len(kept) > 1 and kept[0]["role"] != "user":
        kept = kept[1:]
    return kept


def _worker_proof(data: dict[str, Any]) -> WorkerProof:
    """The proof as saved; keys it no longer has (``usage_signature_verified``, always true,
    saved before it went) are left out, so an older context still opens."""
    names = {f.name for f in fields(WorkerProof)}
    return WorkerProof(**{k: v for k, v in data.items() if k in names})


class ContextStore:
    """Per-place context in Redis, sealed: a private chat's, or in a group one asker's in one
    topic (:attr:`bot.groups.Place.scope`), or the topic's own when its members share one
    (``shared_topics``: the operator's ``COCOON_GROUP_CONTEXT=topic``). One per bot process."""

    def __init__(
        self,
        redis: AsyncRedis,
        key: bytes,
        *,
        ttl_s: int,
        max_messages: int,
        shared_topics: bool = False,
    ) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError("the context key must be 32 bytes")
        self.redis = redis
        self._key = key
        self.ttl_s = ttl_s
        self.max_messages = max_messages
        self.shared_topics = shared_topics

    def scope_of(self, place: Place) -> int | str:
        """The name of ``place``'s context."""
        return place.context_scope(self.shared_topics)

    def shared(self, place: Place) -> bool:
        """Whether ``place``'s context is its topic's, shared by its members."""
        return self.shared_topics and not place.private

    @staticmethod
    def redis_key(chat_id: int | str) -> str:
        return redis_key(CONTEXT, str(chat_id))

    def _aad(self, chat_id: int | str) -> bytes:
        return f"cocoon-bot-context:{chat_id}".encode()

    def seal(self, chat_id: int | str, conversation: Conversation) -> bytes:
        plain = json.dumps(asdict(conversation), separators=(",", ":")).encode()
        nonce = nacl.utils.random(NONCE_BYTES)
        box = sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(
            plain, self._aad(chat_id), nonce, self._key
        )
        return VERSION + nonce + box

    def open(self, chat_id: int | str, blob: bytes) -> Conversation:
        if not blob.startswith(VERSION):
            raise ValueError("unknown context format")
        nonce, box = blob[1 : 1 + NONCE_BYTES], blob[1 + NONCE_BYTES :]
        plain = sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(
            box, self._aad(chat_id), nonce, self._key
        )
        data = json.loads(plain)
        last = data.get("last")
        return Conversation(
            messages=list(data.get("messages") or []),
            last=LastTurn(
                turn_id=last["turn_id"], model=last["model"], worker=_worker_proof(last["worker"])
            )
            if last
            else None,
            conversation_id=str(data.get("conversation_id") or ""),
            pending=str(data.get("pending") or ""),
            system=str(data.get("system") or ""),
        )

    async def load(self, chat_id: int | str) -> Conversation:
        blob = await self.redis.get(self.redis_key(chat_id))
        if blob is None:
            return Conversation()
        try:
            if not isinstance(blob, bytes):
                raise TypeError("a decoded reply: the context store's client must not decode")
            return self.open(chat_id, blob)
        except (ValueError, TypeError, KeyError, nacl.exceptions.CryptoError):
            # A rotated key or a damaged blob: start over rather than fail the chat.
            log.warning("chat context of one chat did not open; starting over")
            return Conversation()

    async def save(self, chat_id: int | str, conversation: Conversation) -> None:
        conversation.messages = conversation.messages[-self.max_messages :]
        await self.redis.set(
            self.redis_key(chat_id), self.seal(chat_id, conversation), ex=self.ttl_s
        )

    async def clear(self, chat_id: int | str) -> None:
        await self.redis.delete(self.redis_key(chat_id))

    async def clear_user(self, telegram_id: int) -> int:
        """Delete a person's contexts in groups (``<chat>:<topic>:<user>``) and their questions
        and answers in topics' shared contexts (``<chat>:<topic>``); how many contexts."""
        pattern = redis_key(CONTEXT, "*", "*", str(telegram_id))
        keys = [key async for key in self.redis.scan_iter(match=pattern, count=500)]
        if keys:
            await self.redis.delete(*keys)
        prefix = redis_key(CONTEXT, "-")[:-1]
        changed = 0
        async for raw in self.redis.scan_iter(match=redis_key(CONTEXT, "-*:*"), count=500):
            name = (raw.decode() if isinstance(raw, bytes) else str(raw))[len(prefix) :]
            if name.count(":") != 1:
                continue  # one asker's (deleted above), not a topic's
            conversation = await self.load(name)
            if conversation.without_asker(telegram_id):
                await self.save(name, conversation)
                changed += 1
        return len(keys) + changed
