"""The sealed client: report → verify → seal → relay → open → check (see :mod:`backend.client`)."""

from __future__ import annotations

import base64
import json
import random
import secrets
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import aiohttp

from backend.attestation.checks import WorkerCheck, check_receipt, check_report
from backend.attestation.policy import Policy
from workers.stream_crypto import StreamOpener
from workers.wire import (
    ChatMessage,
    ErrorRecord,
    FinalRecord,
    JobRequest,
    SamplingParams,
    StreamChunk,
    WireError,
    new_reply_keypair,
    public_b64,
    seal_request,
)

__all__ = ["SealedClient", "SealedError", "SealedReply"]

MAX_LINE_BYTES = 96 * 1024 * 1024


class SealedError(RuntimeError):
    """The turn could not be had, or what came back does not verify (``code`` says which)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class SealedReply:
    """A verified sealed turn: the text, and what proves who served it and for how much."""

    text: str
    job_id: str
    completion_id: str
    worker: WorkerCheck
    final: FinalRecord
    receipt: dict[str, Any]
    cost_nanoton: int
    usage: dict[str, int] = field(default_factory=dict)


class SealedClient:
    """One per backend and API key. ``async with`` it, or :meth:`close` it."""

    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        policy: Policy,
        allow_dev: bool = False,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.policy = policy
        self.allow_dev = allow_dev
        self._own_session = session is None
        self.session = session or aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_read=600)
        )

    async def __aenter__(self) -> SealedClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._own_session:
            await self.session.close()

    async def workers(self, model: str) -> list[WorkerCheck]:
        """Every worker of a fresh report for ``model``, checked here (trusted or not, and why)."""
        nonce = secrets.token_hex(32)
        query = {"model": model, "nonce": nonce}
        async with self.session.get(f"{self.url}/v1/attestation/report", params=query) as reply:
            body = await reply.json(content_type=None)
            if reply.status != 200:
                raise SealedError(
                    "no_report", f"no attestation report (HTTP {reply.status}): {body}"
                )
        if not isinstance(body, dict) or body.get("nonce") != nonce:
            raise SealedError("report_refused", "the report does not answer this client's nonce")
        return await check_report(
            body, model=model, nonce=nonce, policy=self.policy, allow_dev=self.allow_dev
        )

    async def chat(
        self,
        model: str,
        messages: Sequence[dict[str, str]],
        *,
        max_tokens: int,
        sampling: dict[str, Any] | None = None,
    ) -> SealedReply:
        """The whole verified reply of one sealed turn."""
        async for item in self.stream(model, messages, max_tokens=max_tokens, sampling=sampling):
            if isinstance(item, SealedReply):
                return item
        raise SealedError("no_reply", "the turn ended without a reply")  # pragma: no cover

    async def stream(
        self,
        model: str,
        messages: Sequence[dict[str, str]],
        *,
        max_tokens: int,
        sampling: dict[str, Any] | None = None,
    ) -> AsyncIterator[str | SealedReply]:
        """The reply's text as it is opened, then the verified :class:`SealedReply`."""
        checks = await self.workers(model)
        trusted = [c for c in checks if c.trusted]
        if not trusted:
            why = "; ".join(f"{c.worker_id}: {', '.join(c.reasons)}" for c in checks) or "none"
            raise SealedError("no_trusted_worker", f"no worker of {model} is trusted ({why})")
        worker = random.choice(trusted)
        reply_key = new_reply_keypair()
        job_id = f"{worker.worker_id}_{uuid.uuid4().hex}-1"
        request = JobRequest(
            job_id=job_id,
            model=model,
            messages=[ChatMessage.model_validate(m) for m in messages],
            sampling=SamplingParams(**(sampling or {})),
            max_tokens=max_tokens,
            reply_key=public_b64(reply_key),
        )
        sealed = seal_request(request, worker.box_public_key)
        body = {
            "model": model,
            "worker_id": worker.worker_id,
            "job_id": job_id,
            "max_tokens": max_tokens,
            "sealed_request": base64.b64encode(sealed).decode("ascii"),
        }
        headers = {"Authorization": f"Bearer {self.api_key}"}
        parts: list[str] = []
        final: FinalRecord | None = None
        head: dict[str, Any] = {}
        url = f"{self.url}/v1/sealed/chat/completions"
        opener = StreamOpener(reply_key, worker.verify_key, job_id)
        async with self.session.post(url, json=body, headers=headers) as reply:
            if reply.status != 200:
                error = await reply.json(content_type=None)
                raise SealedError("refused", f"HTTP {reply.status}: {_message(error)}")
            async for event in _events(reply):
                kind = event.get("object")
                if kind == "cocoon.sealed.start":
                    head = event
                elif kind == "cocoon.sealed.event":
                    opened = _open(event, opener)
                    if isinstance(opened, StreamChunk):
                        parts.append(opened.text)
                        yield opened.text
                    elif isinstance(opened, FinalRecord):
                        final = opened
                    else:
                        raise SealedError(opened.code, f"the worker: {opened.message}")
                elif kind == "cocoon.receipt":
                    text = "".join(parts)
                    yield self._verified(event, worker, job_id, sealed, text, final, head)
                    return
                elif "error" in event:
                    raise SealedError("turn_failed", _message(event))
        raise SealedError("no_receipt", "the stream ended without a receipt")

    @staticmethod
    def _verified(
        event: dict[str, Any],
        worker: WorkerCheck,
        job_id: str,
        sealed: bytes,
        text: str,
        final: FinalRecord | None,
        head: dict[str, Any],
    ) -> SealedReply:
        if final is None:
            raise SealedError("no_final", "the worker sent no signed final record")
        receipt = event.get("receipt")
        reasons, signed = check_receipt(
            receipt, [worker], job_id=job_id, reply=text, sealed_request=sealed
        )
        if signed is not None:
            usage = signed.receipt
            if (usage.prompt_tokens, usage.completion_tokens) != (
                final.prompt_tokens,
                final.completion_tokens,
            ):
                reasons.append("the receipt's usage is not the final record's")
        if reasons or not isinstance(receipt, dict):
            raise SealedError("receipt_refused", "; ".join(reasons) or "no receipt")
        return SealedReply(
            text=text,
            job_id=job_id,
            completion_id=str(head.get("id", "")),
            worker=worker,
            final=final,
            receipt=receipt,
            cost_nanoton=int(str(event.get("cost_nanoton", "0"))),
            usage=dict(event.get("usage") or {}),
        )


def _open(event: dict[str, Any], opener: StreamOpener) -> StreamChunk | FinalRecord | ErrorRecord:
    """The next event of the stream, opened in its place (its key is the client's alone)."""
    try:
        blob = base64.b64decode(str(event.get("sealed")), validate=True)
        return opener.open(blob)
    except (ValueError, WireError) as error:
        raise SealedError("event_refused", f"an event does not open or verify: {error}") from None


async def _events(reply: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """The ``data:`` objects of a Server-Sent Events body, until ``[DONE]``."""
    buffer = b""
    async for piece in reply.content.iter_any():
        buffer += piece
        if len(buffer) > MAX_LINE_BYTES:
            raise SealedError("too_large", "an event is too large")
        while b"\n\n" in buffer:
            line, buffer = buffer.split(b"\n\n", 1)
            if not line.startswith(b"data: "):
                continue
            data = line[len(b"data: ") :]
            if data.strip() == b"[DONE]":
                return
            event = json.loads(data)
            if isinstance(event, dict):
                yield event


def _message(body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message"))
    return str(body)[:500]
