"""Serving an aiohttp application on a host and port, the same way for the web app, the metrics
endpoint and the local TON Center: a port that cannot be bound leaves nothing set up behind."""

from __future__ import annotations

from typing import Any

from aiohttp import web


async def start_site(app: web.Application, host: str, port: int, **options: Any) -> web.AppRunner:
    """``app`` listening on ``host:port`` (``options`` go to its :class:`web.AppRunner`).
    Stop it with ``runner.cleanup()``."""
    runner = web.AppRunner(app, **options)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner
