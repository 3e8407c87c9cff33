"""`cocoon up` as the README runs it: its own Redis, a worker, the API; then `cocoon chat`."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import redis

from tests.support.env import require_module
from tests.support.ops import free_port, start_cocoon_up

require_module("llama_cpp")

pytestmark = pytest.mark.engine


def test_up_then_chat(tmp_path: Path) -> None:
    redis_port, web_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("COCOON_")}
    env.update(
        COCOON_DATA_DIR=str(tmp_path / "data"),
        COCOON_SECRETS_DIR=str(tmp_path / "secrets"),
        COCOON_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0",
        COCOON_WEB_PORT=str(web_port),
    )

    def cocoon(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        """A ``cocoon`` command against this stack, run to its end, its output read."""
        command = [sys.executable, "-m", "backend.cli", *args]
        return subprocess.run(
            command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout_s
        )

    up = start_cocoon_up(env, tmp_path, tmp_path / "up.log")
    try:
        key_file = tmp_path / "data" / "local-api-key"
        deadline = time.monotonic() + 120
        while True:
            assert up.poll() is None, (tmp_path / "up.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "up.log").read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/healthz") as reply:
                    if reply.status == 200 and key_file.exists():
                        break
            except OSError:
                pass
            time.sleep(0.3)
        assert "started" in (tmp_path / "up.log").read_text()  # it said which Redis it ran
        # It said where the context key is: outside the data directory.
        assert (
            f"context key in {tmp_path / 'secrets' / 'context.key'}"
            in (tmp_path / "up.log").read_text()
        )
        assert not (tmp_path / "data" / "context.key").exists()

        chat = cocoon("chat", "Say hello.", "--max-tokens", "12")
        assert chat.returncode == 0, chat.stderr
        assert chat.stdout.strip()
        assert "development TEE" in chat.stderr and "signed usage verified" in chat.stderr

        # Sealed here, to the worker verified here (its development TEE allowed explicitly).
        sealed = cocoon("chat", "--sealed", "--allow-dev", "Say hi.")
        assert sealed.returncode == 0, sealed.stderr
        assert sealed.stdout.strip() and "verified here" in sealed.stderr

        request = urllib.request.Request(
            f"http://127.0.0.1:{web_port}/v1/chat/completions",
            data=json.dumps(
                {
                    "model": "smollm2-135m",
                    "max_tokens": 8,
                    "messages": [{"role": "user", "content": "Hi"}],
                }
            ).encode(),
            headers={"Authorization": f"Bearer {key_file.read_text().strip()}"},
        )
        with urllib.request.urlopen(request, timeout=120) as reply:
            body = json.load(reply)
        assert body["choices"][0]["message"]["content"]
        assert int(body["cocoon"]["cost_nanoton"]) > 0

        # Top up on the local TON chain with the user's memo: the watcher credits it, once.
        output = (tmp_path / "up.log").read_text()
        ton_url = re.search(r"local TON Center .* at (http://\S+);", output).group(1)  # type: ignore[union-attr]
        account = re.search(r'"account": "([^"]+)"', output).group(1)  # type: ignore[union-attr]

        def balance() -> tuple[str, int]:
            result = cocoon("ledger", "balance", "--telegram-id", "1", timeout_s=60)
            memo = re.search(r"deposit memo (\w+)", result.stdout).group(1)  # type: ignore[union-attr]
            available = int(re.search(r"available: (\d+)", result.stdout).group(1))  # type: ignore[union-attr]
            return memo, available

        memo, before = balance()
        deposit = urllib.request.Request(
            f"{ton_url}/localnet/deposit",
            data=json.dumps({"account": account, "value": "2000000000", "comment": memo}).encode(),
        )
        with urllib.request.urlopen(deposit, timeout=30) as reply:
            assert reply.status == 200
        deadline = time.monotonic() + 60
        while balance()[1] != before + 2_000_000_000:
            assert time.monotonic() < deadline, "the deposit was not credited"
            time.sleep(0.5)
        time.sleep(2)  # a few more polls of the watcher: still credited once
        assert balance()[1] == before + 2_000_000_000
    finally:
        os.killpg(up.pid, signal.SIGINT)
        up.wait(timeout=60)
    # Everything it started is gone with it: the Redis it ran no longer answers.
    client = redis.Redis(port=redis_port, socket_connect_timeout=1)
    try:
        client.ping()
        raise AssertionError("the Redis started by cocoon up outlived it")
    except redis.ConnectionError:
        pass
    finally:
        client.close()
