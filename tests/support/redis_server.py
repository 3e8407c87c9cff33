"""A redis-server of a test's own, on a free loopback port: to restart it, to give it a TLS
listener, without touching the shared test server. Certificates are made with the ``openssl``
command (a CA, and a server certificate for 127.0.0.1 signed by it). And a real worker node
process that onboards over HTTP: started, stopped, waited for until the registry lists it
attested or until it exits; or started with the API it onboards at, over a Redis of the test's
own."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import redis
import redis.asyncio as aioredis

from backend.attestation import store
from backend.settings import Settings
from tests.support.env import IN_CI
from tests.support.ops import Api, api_server, api_serves
from workers import redisconn, registry


def require(program: str) -> str:
    """The program's path; skip the test without it (fail in CI)."""
    path = shutil.which(program)
    if path is None:
        if IN_CI:
            pytest.fail(f"{program} is not installed", pytrace=False)
        pytest.skip(f"{program} is not installed")
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


def make_certificates(directory: Path) -> TlsFiles:
    """A throwaway CA and a server certificate for IP 127.0.0.1 signed by it (EC P-256)."""
    openssl = require("openssl")
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / "ca.crt", directory / "ca.key"
    cert, key, csr = directory / "server.crt", directory / "server.key", directory / "server.csr"
    ext = directory / "server.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for command in (
        [openssl, "req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "2",
         "-subj", "/CN=Cocoon test CA"],
        [openssl, "req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        [openssl, "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
         "-out", cert, "-days", "2", "-extfile", ext],
    ):  # fmt: skip
        subprocess.run([str(part) for part in command], check=True, capture_output=True)
    return TlsFiles(ca=ca, cert=cert, key=key)


class RedisServer:
    """``redis-server`` on a free port, with append-only persistence (fsync always) so that a
    restart keeps the data; ACL users made at run time are not persisted, as in production."""

    def __init__(self, directory: Path, *, tls: TlsFiles | None = None) -> None:
        self.binary = require("redis-server")
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.tls = tls
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    def url(self, db: int = 0) -> str:
        if self.tls is None:
            return f"redis://127.0.0.1:{self.port}/{db}"
        return f"rediss://127.0.0.1:{self.port}/{db}?ssl_ca_certs={self.tls.ca}"

    def start(self) -> None:
        command = [
            self.binary, "--bind", "127.0.0.1", "--dir", str(self.directory), "--save", "",
            "--appendonly", "yes", "--appendfsync", "always",
        ]  # fmt: skip
        if self.tls is None:
            command += ["--port", str(self.port)]
        else:  # TLS only: no plaintext listener at all
            command += [
                "--port", "0", "--tls-port", str(self.port),
                "--tls-cert-file", str(self.tls.cert), "--tls-key-file", str(self.tls.key),
                "--tls-ca-cert-file", str(self.tls.ca), "--tls-auth-clients", "no",
            ]  # fmt: skip
        log = (self.directory / "redis.log").open("ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=log)
        log.close()
        client = redis.Redis.from_url(self.url(), socket_timeout=1)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    if client.ping():
                        return
                except (redis.ConnectionError, redis.TimeoutError):
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        log_text = (self.directory / "redis.log").read_text()
                        raise RuntimeError(f"redis-server did not start: {log_text}") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        """Stop it (SIGTERM: it flushes the append-only file and exits)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()
        self.restarts += 1


REPO = Path(__file__).resolve().parents[2]


def start_node(
    register_url: str, token: str, log: Path, *, model: str, extra: tuple[str, ...] = ()
) -> subprocess.Popen[bytes]:
    """A real worker node (instant engine) that onboards at ``register_url`` with dev evidence."""
    import sys

    command = [
        sys.executable, "-m", "workers.node", "--model", model, "--engine", "instant",
        "--register-url", register_url, "--token", token, "--tee", "dev", "--heartbeat", "0.5",
        "--grace", "1", "--register-wait", "20", *extra,
    ]  # fmt: skip
    with log.open("ab") as out:
        return subprocess.Popen(command, cwd=REPO, stdout=out, stderr=out)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.asynccontextmanager
async def api_with_node(
    s: Settings, telegram_id: int, log: Path, model: str
) -> AsyncIterator[tuple[Api, aioredis.Redis, subprocess.Popen[bytes]]]:
    """The API over ``s`` (``api_server``: Telegram user ``telegram_id`` funded, an API key), an
    admin client of ``s``'s Redis, and a worker node of ``model`` onboarding at the API with a
    fresh registration token, its output in ``log``; all stopped at the end."""
    admin = redisconn.async_client(s.redis_url)
    try:
        async with api_server(s, with_metrics=False, telegram_id=telegram_id) as api:
            token = await store.issue_registration_token(admin, None, 60)
            node = start_node(api.url, token, log, model=model)
            try:
                yield api, admin, node
            finally:
                stop_process(node)
    finally:
        await admin.aclose()


async def read_log(log: Path) -> str:
    return await asyncio.to_thread(log.read_text)


async def attested_worker(
    admin: aioredis.Redis,
    node: subprocess.Popen[bytes],
    log: Path,
    model: str,
    *,
    api_url: str | None = None,
) -> str:
    """The id of the first attested worker of ``model`` once the registry lists one (within
    30 s, while ``node`` runs; else fail with its log). With ``api_url``, also once the API
    says so (``GET /health``), as a client would wait: the API reads the registry into its copy
    every second, so it may list the worker a moment after the registry does."""
    deadline = time.monotonic() + 30
    while True:
        attested = [w for w in await registry.list_workers(admin, model) if w.attested]
        if attested:
            break
        assert node.poll() is None and time.monotonic() < deadline, await read_log(log)
        await asyncio.sleep(0.1)
    if api_url is not None:
        async with aiohttp.ClientSession() as session:
            while not await api_serves(session, api_url, model):
                assert node.poll() is None and time.monotonic() < deadline, await read_log(log)
                await asyncio.sleep(0.1)
    return attested[0].worker_id


async def exit_status(node: subprocess.Popen[bytes], log: Path, timeout_s: float = 30) -> int:
    """The exit status of ``node``, waited for without blocking the event loop (the server it
    talks to may run on it); stopped, and failed with its log, after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while node.poll() is None:
        if time.monotonic() > deadline:
            stop_process(node)
            raise AssertionError(f"the node did not exit: {await read_log(log)}")
        await asyncio.sleep(0.1)
    return node.returncode
