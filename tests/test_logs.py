"""Structured logs: JSON lines carrying the turn's and job's ids, and never the text of a prompt
or a reply, from a real turn through the OpenAI API and a real worker node process."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from backend.logs import bind, bound, current, setup_logging
from backend.settings import DEFAULT_MODEL, Settings
from tests.support.ops import InstantNode, api_server, dev_settings
from workers.logcontext import HANDLER_NAME

CANARY = "zebracanary-51f0c3"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


def json_lines(text: str) -> list[dict]:
    lines = [line for line in text.splitlines() if line.strip()]
    return [json.loads(line) for line in lines]  # every line is one JSON object


@pytest.mark.slow
async def test_json_lines_carry_turn_and_job_ids_and_never_the_prompt_or_reply(
    settings: Settings, redis_url: str, tmp_path: Path, restore_logging: None
) -> None:
    stream = io.StringIO()
    setup_logging(
        settings.model_copy(update={"log_json": True, "log_level": "DEBUG"}), stream=stream
    )
    worker_log = tmp_path / "worker.log"
    node = InstantNode(redis_url, log_file=worker_log, log_json=True, log_level="DEBUG")
    try:
        async with api_server(dev_settings(settings)) as api, aiohttp.ClientSession() as http:
            for stream_reply in (False, True):
                async with http.post(
                    f"{api.url}/v1/chat/completions",
                    json={
                        "model": DEFAULT_MODEL,
                        "messages": [{"role": "user", "content": f"please repeat {CANARY} now"}],
                        "max_tokens": 8,
                        "stream": stream_reply,
                    },
                    headers={"Authorization": f"Bearer {api.key}"},
                ) as response:
                    body = await response.text()
                    assert response.status == 200, body
                    assert CANARY in body  # the instant engine echoes it: the reply has it
            turn_id = json.loads(body.split("data: ", 2)[1].split("\n")[0])["id"].removeprefix(
                "chatcmpl-"
            )
    finally:
        node.stop()

    backend_text = stream.getvalue()
    worker_text = worker_log.read_text()
    assert CANARY not in backend_text
    assert CANARY not in worker_text

    backend_records = json_lines(backend_text)
    turn_records = [r for r in backend_records if r.get("turn_id") == turn_id]
    assert turn_records, backend_text
    assert {"time", "level", "logger", "message"} <= set(turn_records[0])
    settled = [r for r in turn_records if "settled" in r["message"]]
    assert settled and settled[0]["logger"] == "cocoon.dispatch"
    assert settled[0]["job_id"].endswith(f"_{turn_id}-1")

    worker_records = json_lines(worker_text)
    jobs = [r for r in worker_records if turn_id in r.get("job_id", "")]
    assert jobs and all(r["job_id"] in r["message"] for r in jobs)


async def test_text_lines_show_the_bound_ids(settings: Settings, restore_logging: None) -> None:
    stream = io.StringIO()
    setup_logging(settings, stream=stream)
    setup_logging(settings, stream=stream)  # twice: still one handler of ours
    assert [h.get_name() for h in logging.getLogger().handlers].count(HANDLER_NAME) == 1
    log = logging.getLogger("cocoon.test")
    with bound(turn_id="t1", update_id=7):
        log.info("inside")
        assert current() == {"turn_id": "t1", "update_id": "7"}
    log.info("outside")
    bind(job_id="j9")
    log.warning("bound")
    bind(job_id=None)
    lines = stream.getvalue().splitlines()
    assert lines[0].endswith("INFO cocoon.test [turn_id=t1 update_id=7]: inside")
    assert lines[1].endswith("INFO cocoon.test: outside")
    assert lines[2].endswith("WARNING cocoon.test [job_id=j9]: bound")
    with pytest.raises(ValueError, match="unknown log context"):
        bind(prompt="no")
