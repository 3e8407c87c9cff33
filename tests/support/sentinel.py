"""Redis with Sentinel on loopback, from real processes: a primary, a replica of it and three
sentinels (``redis-server --sentinel``) watching them, each on a free port, in a directory of
the test's own. The primary can be killed (SIGKILL: no goodbye) to make the sentinels fail
over to the replica."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import redis

from tests.support.redis_server import free_port, require

SERVICE = "cocoon"
DOWN_AFTER_MS = 1000  # the sentinels take a silent primary for down after this
FAILOVER_TIMEOUT_MS = 5000


class SentinelSet:
    """A primary, a replica and three sentinels; :meth:`url` is the ``redis+sentinel://`` URL
    Cocoon's clients are given."""

    def __init__(self, directory: Path) -> None:
        self.binary = require("redis-server")
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.primary_port = free_port()
        self.replica_port = free_port()
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def url(self, db: int = 0) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{SERVICE}/{db}"

    def _start(self, name: str, command: list[str]) -> None:
        log = (self.directory / f"{name}.log").open("ab")
        self.processes[name] = subprocess.Popen(command, stdout=log, stderr=log)
        log.close()

    def _data_server(self, name: str, port: int, *extra: str) -> None:
        data = self.directory / name
        data.mkdir(exist_ok=True)
        self._start(name, [
            self.binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data),
            "--save", "", "--appendonly", "yes", "--appendfsync", "always", *extra,
        ])  # fmt: skip

    def start(self) -> None:
        self._data_server("primary", self.primary_port)
        self._wait(self.primary_port, lambda c: bool(c.ping()))
        self._data_server("replica", self.replica_port, "--replicaof", "127.0.0.1",
                          str(self.primary_port))  # fmt: skip
        self._wait(
            self.replica_port,
            lambda c: c.info("replication").get("master_link_status") == "up",
        )
        for index, port in enumerate(self.sentinel_ports):
            config = self.directory / f"sentinel-{index}.conf"
            config.write_text(
                f"bind 127.0.0.1\nport {port}\ndir {self.directory}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary_port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
            self._start(f"sentinel-{index}", [self.binary, str(config), "--sentinel"])

        # Ready when each sentinel knows the replica and the two other sentinels: a failover
        # needs a quorum and a replica to promote.
        def ready(client: redis.Redis) -> bool:
            master = client.sentinel_master(SERVICE)
            return int(master["num-slaves"]) == 1 and int(master["num-other-sentinels"]) == 2

        for port in self.sentinel_ports:
            self._wait(port, ready, timeout_s=60)

    def _wait(self, port: int, check: object, timeout_s: float = 20) -> None:
        assert callable(check)
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1, decode_responses=True)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    if check(client):
                        return
                except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
                    pass
                if time.monotonic() > deadline:
                    logs = {p.name: p.read_text()[-2000:] for p in self.directory.glob("*.log")}
                    raise RuntimeError(f"port {port} was not ready: {logs}")
                time.sleep(0.05)
        finally:
            client.close()

    def primary(self) -> tuple[str, int]:
        """The primary's address, as the sentinels name it now."""
        client = redis.Redis(host="127.0.0.1", port=self.sentinel_ports[0], socket_timeout=1)
        try:
            host, port = client.sentinel_get_master_addr_by_name(SERVICE)
            return str(host), int(port)
        finally:
            client.close()

    def kill_primary(self) -> None:
        """SIGKILL the primary: no shutdown, no last write."""
        process = self.processes["primary"]
        process.kill()
        process.wait()

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
