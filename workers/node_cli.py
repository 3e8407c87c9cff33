"""The ``cocoon worker`` command line: its options, and the :class:`NodeConfig` they make.

Nothing here starts anything (:func:`workers.node.main` does); the worker image runs without
the operator's packages, so the default Redis URL comes from the environment variable
``COCOON_REDIS_URL`` (read here, as the operator's settings read it), not from their settings.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from workers import registry
from workers.metrics import METRICS_PORT_ENV, metrics_port_from_env

__all__ = ["NodeConfig", "build_parser", "config_from_args", "parse_engine_options"]

REDIS_URL_ENV = "COCOON_REDIS_URL"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
COALESCE_ENV = "COCOON_STREAM_COALESCE_MS"
DEFAULT_COALESCE_MS = 2.0
MAX_COALESCE_MS = 50.0
"""A chunk after the first waits at most this long for more tokens (``--stream-coalesce-ms``)."""


@dataclass(frozen=True)
class NodeConfig:
    """What a node is started with (the CLI's arguments)."""

    model: str
    engine: str
    redis_url: str
    capacity: int = 64
    engine_options: Mapping[str, Any] = field(default_factory=dict)
    worker_id: str | None = None
    provider_id: int | None = None
    heartbeat_s: float = 2.0
    ttl_s: int = registry.DEFAULT_TTL_S
    grace_s: float = 30.0
    register_url: str | None = None
    token: str | None = None
    tee: str = "auto"
    register_wait_s: float = 120.0
    metrics_port: int | None = None  # serve Prometheus /metrics on this port (None: off)
    metrics_host: str = "0.0.0.0"
    redis_ca_pem: str | None = None  # the CA bundle of the Redis server (from the credentials)
    stream_coalesce_ms: float = DEFAULT_COALESCE_MS  # see workers.job_run


def parse_engine_options(pairs: Sequence[str]) -> dict[str, Any]:
    """``["n_ctx=4096", "model_path=/m.gguf"]`` → ``{"n_ctx": 4096, "model_path": "/m.gguf"}``.

    A value that parses as JSON (numbers, true/false, null) is taken as such, else as a string.
    """
    options: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"--engine-option takes name=value, got {pair!r}")
        try:
            options[name.replace("-", "_")] = json.loads(raw)
        except ValueError:
            options[name.replace("-", "_")] = raw
    return options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cocoon worker", description="Run a Cocoon worker node: serve one model's jobs."
    )
    parser.add_argument("--model", required=True, help="model id served, e.g. smollm2-135m")
    parser.add_argument("--engine", required=True, help="llama-cpp, openai, vllm or instant")
    parser.add_argument("--capacity", type=int, default=64, help="jobs run at once (default 64)")
    parser.add_argument(
        "--redis-url",
        help="register directly as an unattested dev worker (default: the environment "
        f"variable {REDIS_URL_ENV}, else {DEFAULT_REDIS_URL})",
    )
    parser.add_argument(
        "--register-url", metavar="URL", help="attest to this backend (cocoon web) first"
    )
    parser.add_argument("--token", help="registration token (cocoon provider token)")
    parser.add_argument(
        "--register-wait",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="how long to keep trying an unreachable backend before exiting (default 120)",
    )
    parser.add_argument(
        "--tee",
        choices=("auto", "tdx", "dev"),
        default="auto",
        help="evidence to send: tdx (configfs-tsm), dev (software), auto (tdx when present)",
    )
    parser.add_argument(
        "--engine-option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="engine keyword argument (repeatable)",
    )
    parser.add_argument(
        "--worker-id", help="default: w-<key fingerprint> (attested: assigned by the backend)"
    )
    parser.add_argument(
        "--provider-id",
        type=int,
        help="Cocoon user id of the provider (attested: from the registration token)",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=30.0,
        help="seconds running jobs get to finish after SIGTERM or SIGINT (default 30)",
    )
    parser.add_argument(
        "--parent-pid",
        type=int,
        metavar="PID",
        help="stop when this process ends (cocoon up passes its own pid)",
    )
    parser.add_argument("--heartbeat", type=float, default=2.0, help="seconds between heartbeats")
    parser.add_argument("--ttl", type=int, default=registry.DEFAULT_TTL_S, help="registry TTL, s")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument(
        "--log-json",
        action="store_true",
        default=os.environ.get("COCOON_LOG_JSON", "").lower() in {"1", "true", "yes"},
        help="one JSON object per log line (default: COCOON_LOG_JSON)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help=f"serve Prometheus /metrics on this port (default: {METRICS_PORT_ENV}, else off)",
    )
    parser.add_argument(
        "--stream-coalesce-ms",
        type=float,
        metavar="MS",
        default=os.environ.get(COALESCE_ENV, DEFAULT_COALESCE_MS),
        help="a reply chunk after the first waits this long for more tokens, 0 to "
        f"{MAX_COALESCE_MS:g} (default: {COALESCE_ENV}, else {DEFAULT_COALESCE_MS:g})",
    )
    return parser


def config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> NodeConfig:
    """The node's configuration from parsed arguments (``parser.error`` on a bad one)."""
    try:
        options = parse_engine_options(args.engine_option)
        metrics_port = (
            args.metrics_port if args.metrics_port is not None else metrics_port_from_env()
        )
    except ValueError as error:
        parser.error(str(error))
    coalesce_ms = float(args.stream_coalesce_ms)
    if not 0 <= coalesce_ms <= MAX_COALESCE_MS:
        parser.error(f"--stream-coalesce-ms must be 0 to {MAX_COALESCE_MS:g}")
    if args.register_url and not args.token:
        parser.error("--register-url needs --token (from `cocoon provider token`)")
    redis_url = args.redis_url or ""
    if not redis_url and not args.register_url:
        redis_url = os.environ.get(REDIS_URL_ENV) or DEFAULT_REDIS_URL
    return NodeConfig(
        model=args.model,
        engine=args.engine,
        redis_url=redis_url,
        capacity=args.capacity,
        engine_options=options,
        worker_id=args.worker_id,
        provider_id=args.provider_id,
        heartbeat_s=args.heartbeat,
        ttl_s=args.ttl,
        grace_s=args.grace,
        register_url=args.register_url,
        token=args.token,
        tee=args.tee,
        register_wait_s=args.register_wait,
        metrics_port=metrics_port,
        stream_coalesce_ms=coalesce_ms,
    )
