"""Prometheus metrics of a worker node, on an HTTP endpoint of its own (off by default).

``cocoon worker --metrics-port 9101`` (or ``COCOON_WORKER_METRICS_PORT=9101``) serves
``GET /metrics`` on that port: jobs by outcome, tokens generated, job duration, jobs running.
Only counts and durations: nothing a job contains. prometheus_client is imported only when the
endpoint is turned on.
"""

from __future__ import annotations

import os
from wsgiref.simple_server import WSGIServer

__all__ = ["METRICS_PORT_ENV", "WorkerMetrics", "metrics_port_from_env"]

METRICS_PORT_ENV = "COCOON_WORKER_METRICS_PORT"
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)


def metrics_port_from_env() -> int | None:
    """The port in ``COCOON_WORKER_METRICS_PORT`` (unset, empty or 0: no endpoint)."""
    raw = os.environ.get(METRICS_PORT_ENV, "").strip()
    if not raw:
        return None
    port = int(raw)
    if not 0 <= port <= 65535:
        raise ValueError(f"{METRICS_PORT_ENV} must be a port number, got {raw!r}")
    return port or None


class WorkerMetrics:
    """The node's counters on a registry of its own."""

    def __init__(self, model: str, engine: str) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.model = model
        self.jobs = Counter(
            "cocoon_worker_jobs",
            "Jobs ended, by outcome (ok, failed, rejected)",
            ["model", "outcome"],
            registry=self.registry,
        )
        self.tokens = Counter(
            "cocoon_worker_tokens",
            "Tokens of finished jobs, by kind (prompt, cached_prompt, completion)",
            ["model", "kind"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "cocoon_worker_job_duration_seconds",
            "Time from taking a job to its end",
            ["model"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.running = Gauge(
            "cocoon_worker_jobs_running", "Jobs running now", ["model"], registry=self.registry
        )
        info = Gauge(
            "cocoon_worker_info", "The node's model and engine", ["model", "engine"],
            registry=self.registry,
        )  # fmt: skip
        info.labels(model, engine).set(1)
        self._server: WSGIServer | None = None

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Start the HTTP endpoint in a thread; returns the port (0 picks a free one)."""
        from prometheus_client import start_http_server

        server, _thread = start_http_server(port, host, registry=self.registry)
        self._server = server
        return int(server.server_address[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def job_ended(
        self,
        outcome: str,
        seconds: float,
        *,
        prompt_tokens: int = 0,
        cached_prompt_tokens: int = 0,
        completion_tokens: int = 0,
    ) -> None:
        self.jobs.labels(self.model, outcome).inc()
        if outcome != "rejected":
            self.duration.labels(self.model).observe(seconds)
        for kind, n in (
            ("prompt", prompt_tokens),
            ("cached_prompt", cached_prompt_tokens),
            ("completion", completion_tokens),
        ):
            if n:
                self.tokens.labels(self.model, kind).inc(n)

    def set_running(self, n: int) -> None:
        self.running.labels(self.model).set(n)
