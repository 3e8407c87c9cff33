"""The web server's own factory, on a real loopback server."""

from __future__ import annotations

from aiohttp.test_utils import TestClient, TestServer

from backend.db import Database
from backend.settings import Settings
from backend.web import create_app


async def test_healthz_reports_the_database(settings: Settings) -> None:
    db = Database.from_settings(settings)
    await db.upgrade()
    await db.close()
    async with TestClient(TestServer(create_app(settings))) as client:
        response = await client.get("/healthz")
        assert response.status == 200
        assert (await response.json()) == {"status": "ok"}
