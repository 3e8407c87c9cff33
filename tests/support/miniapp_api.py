"""The Mini App's API test fixtures, shared by its test modules: ``cocoon web`` in a test
client on this database, the npm packages, and the one shape of a refusal."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from backend import appkeys
from backend.settings import Settings
from backend.web import create_app
from tests.support.miniapp_helpers import app_settings


@pytest.fixture(name="node_modules")
def node_modules_fixture() -> None:
    """The npm packages in miniapp/node_modules (skipped without them, except in CI)."""
    from miniapp.assets import TONCONNECT_DIST, TONCONNECT_FILE
    from tests.support.env import IN_CI

    if not (TONCONNECT_DIST / TONCONNECT_FILE).is_file():
        message = "miniapp/node_modules is missing: run npm ci in miniapp/"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(name="client")
async def client_fixture(settings: Settings, db_url: str) -> AsyncIterator[TestClient]:
    client = TestClient(TestServer(create_app(app_settings(settings, db_url))))
    await client.start_server()
    await client.app[appkeys.DATABASE].upgrade()
    yield client
    await client.close()


async def error_of(response, status: int) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """The error of a refusal: a stable code, a sentence, and the details a page needs to say
    it itself; never an exception's text, an internal limit or nanoTON."""
    assert response.status == status, await response.text()
    body = await response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}
    message = body["error"]["message"]
    assert message and "nanoTON" not in message and "9223372036854775807" not in message
    assert "Traceback" not in message and "got '" not in message
    return body["error"]
