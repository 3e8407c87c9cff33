"""``cocoon chat --sealed``: one sealed turn through the running web server, verified here."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from backend import cliutil
from backend.attestation.policy import Policy, PolicyError, load_policy
from backend.client.sealed import SealedClient, SealedError, SealedReply
from backend.settings import Settings

__all__ = ["run_sealed_chat"]


def run_sealed_chat(settings: Settings, args: argparse.Namespace, question: str) -> int:
    """Stream the answer to ``question``; exit 0, 1 when the turn fails or does not verify."""
    url = args.url or f"http://{settings.web_host}:{settings.web_port}"
    key = args.api_key or _local_key(settings.data_dir / "local-api-key")
    try:
        path = args.policy or settings.attestation.policy_file
        policy = load_policy(path) if path else Policy()
    except PolicyError as error:
        cliutil.fail(str(error))
    allow_dev = args.allow_dev or settings.attestation.allow_dev
    model = args.model or settings.default_model()
    messages = [{"role": "user", "content": question}]
    max_tokens = args.max_tokens or settings.max_tokens_default

    async def run() -> int:
        async with SealedClient(url, key, policy=policy, allow_dev=allow_dev) as client:
            try:
                async for item in client.stream(model, messages, max_tokens=max_tokens):
                    if isinstance(item, SealedReply):
                        print()
                        print(_footer(item), file=sys.stderr)
                    else:
                        print(item, end="", flush=True)
            except SealedError as error:
                print(file=sys.stderr)
                print(f"cocoon: error: {error} ({error.code})", file=sys.stderr)
                return 1
        return 0

    return asyncio.run(run())


def _footer(reply: SealedReply) -> str:
    worker = reply.worker
    tee = (
        "development TEE (proves nothing about the machine)" if worker.tee == "dev" else worker.tee
    )
    image = f" {worker.image}" if worker.image else ""
    usage = reply.final
    return (
        f"[sealed · {usage.prompt_tokens}+{usage.completion_tokens} tokens · "
        f"{reply.cost_nanoton} nanoTON · {tee}{image}, {worker.engine}, worker "
        f"{worker.worker_id} verified here; receipt signed by its attested key, covering this "
        f"request and this reply]"
    )


def _local_key(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        cliutil.fail(f"no API key: pass --api-key, or run `cocoon up` (it writes {path})")
