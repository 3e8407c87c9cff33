"""The worker node: one process, one engine, many jobs at once.

``cocoon worker --model NAME --engine ENGINE [--capacity 64] [--redis-url URL]
[--engine-option k=v ...]`` (or ``python -m workers.node ...``):

1. generates the node's keys (:class:`workers.wire.WorkerKeys`) in memory only: they are never
   written to disk, to Redis or to the logs; a restarted node is a new worker;
2. loads the engine once, attests (below), then serves jobs until a signal
   (:class:`workers.serving.Node`: registry, heartbeats, its RQ queue, jobs at once up to
   ``min(--capacity, engine.max_concurrency)``, graceful shutdown).

A signal while the engine loads or the node attests stops it at once. With ``--parent-pid PID``
(``cocoon up`` passes its own) the node stops the same way when that process ends: Linux tells
it (``PR_SET_PDEATHSIG``) and it checks its parent every second as well.

Attestation. With ``--register-url URL --token T`` the node first proves itself to the backend
(:mod:`workers.attest_client`: its keys, model, weights digest and engine configuration, bound
to the backend's nonce), and receives its worker id and Redis credentials of its own (an ACL
user) that reach its own keys only: the backend indexes it, counts its load and releases its
slots. Outside the development TEE it connects to Redis only with TLS (``rediss://``, checked
against the CA bundle that came with the credentials; a plain ``redis://`` is refused: exit 3).
It attests again before the evidence expires, and at once when Redis refuses its credentials (a
Redis restart or failover: the backend recreates its user, or gives it a new password); if the
backend refuses, the node has been revoked and shuts down. A node that cannot onboard (refused:
exit 3; no evidence: exit 3; the backend unreachable for ``--register-wait`` seconds: exit 1)
says why and exits, so that a supervisor restarts it. An engine that would send prompts off the
machine runs only with the development TEE (otherwise: exit 3 before anything loads).

Without ``--register-url`` the node registers itself directly with ``--redis-url`` (default:
``COCOON_REDIS_URL``; options in :mod:`workers.node_cli`): an unattested development worker,
dispatched only by backends in dev mode (``COCOON_ATTESTATION__ALLOW_DEV=true``) and shown
everywhere as ``tee=dev``.

Logs carry job ids, durations and token counts: never prompt or reply text, never keys
(``--log-json`` or ``COCOON_LOG_JSON=true``: one JSON object per line, with the ``job_id``).
``--metrics-port`` (or ``COCOON_WORKER_METRICS_PORT``) serves Prometheus ``/metrics`` of the
node (:mod:`workers.metrics`): jobs by outcome, tokens, job duration, jobs running.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Sequence
from dataclasses import replace
from typing import TypeVar

from workers import redis_auth
from workers.attest_client import (
    Attestation,
    BackendUnreachable,
    EngineRefused,
    placement_refusal,
)
from workers.engines import EngineError, create_engine
from workers.evidence import AttestationRefused, EvidenceError
from workers.lifecycle import Shutdown, die_with_parent, exit_within, watch_parent
from workers.logcontext import configure as configure_logging
from workers.metrics import WorkerMetrics
from workers.node_cli import NodeConfig, build_parser, config_from_args, parse_engine_options
from workers.serving import Node
from workers.wire import WorkerKeys

__all__ = ["Node", "NodeConfig", "build_parser", "main", "parse_engine_options", "run_node"]

log = logging.getLogger("cocoon.worker")

T = TypeVar("T")


# -- process entry points ------------------------------------------------------------------------


async def _unless_stopped(awaitable: Awaitable[T], stop: asyncio.Event) -> tuple[bool, T | None]:
    """``(True, result)`` of ``awaitable``, or ``(False, None)`` when ``stop`` is set first (it
    is then cancelled): what a node does before it serves must not outlast a signal."""
    task = asyncio.ensure_future(awaitable)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([task, stopping], return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        stopping.cancel()
    if task.done():
        return True, task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return False, None


async def run_node(
    config: NodeConfig, stop: asyncio.Event, force: asyncio.Event | None = None
) -> None:
    """Load the engine once, then serve until ``stop`` is set (``force``: no grace period).

    ``stop`` set while the engine loads or the node attests ends it there, without serving.
    """
    engine = create_engine(config.engine, config.model, **dict(config.engine_options))
    # A direct registration is a development worker: it may run any engine, labelled so.
    refusal = placement_refusal(engine, config.tee if config.register_url else "dev")
    if refusal:
        raise EngineRefused(refusal)
    metrics = None
    if config.metrics_port is not None:
        metrics = WorkerMetrics(config.model, config.engine)
        port = metrics.serve(config.metrics_port, config.metrics_host)
        log.info("metrics on http://%s:%d/metrics", config.metrics_host, port)
    started = time.monotonic()
    try:
        loaded, _ = await _unless_stopped(engine.start(), stop)
        if not loaded:
            log.info("stopped while the engine was loading")
            return
        log.info("engine %s loaded in %.1fs", engine, time.monotonic() - started)
        keys = WorkerKeys.generate()
        attestation = None
        if config.register_url:
            attestation = Attestation(config, keys, engine)
            attested, registration = await _unless_stopped(
                attestation.attest(config.token or ""), stop
            )
            if not attested or registration is None:
                log.info("stopped while onboarding: not attested")
                return
            config = replace(
                config,
                redis_url=registration.redis_url,
                worker_id=registration.worker_id,
                redis_ca_pem=registration.redis_ca_pem,
            )
        await Node(config, engine, keys, attestation, metrics).serve(stop, force)
        if attestation is not None and attestation.revoked is not None:
            raise attestation.revoked  # shut down: the backend revoked this worker
    finally:
        await engine.close()
        if metrics is not None:
            metrics.close()


def main(argv: Sequence[str] | None = None) -> int:
    """The ``cocoon worker`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level.upper(), json_lines=args.log_json)
    config = config_from_args(parser, args)
    try:
        return asyncio.run(_serve_until_signalled(config, args.parent_pid))
    except EngineError as error:
        log.error("the engine could not start: %s", error)
        return 1
    except EngineRefused as error:
        log.error("the engine is refused: %s", error)
        return 3
    except AttestationRefused as error:
        log.error("the backend refused this worker: %s", error)
        return 3
    except EvidenceError as error:
        log.error("no evidence can be taken on this machine: %s", error)
        return 3
    except redis_auth.TlsRefused as error:
        log.error("not connecting to Redis: %s", error)
        return 3
    except BackendUnreachable as error:
        log.error("%s: not onboarded, exiting", error)
        return 1


async def _serve_until_signalled(config: NodeConfig, parent_pid: int | None = None) -> int:
    """Run the node under SIGINT/SIGTERM handlers (and its parent's watch); the exit code."""
    shutdown = Shutdown(config.grace_s, announce=log.warning).install()
    watch: asyncio.Task[None] | None = None
    if parent_pid is not None:
        die_with_parent(signal.SIGTERM)
        watch = asyncio.create_task(watch_parent(parent_pid, shutdown))
    try:
        await run_node(config, shutdown.stop, shutdown.force)
    finally:
        if watch is not None:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
        shutdown.uninstall()
    return shutdown.exit_code()


def entry() -> None:
    """The process entry (``cocoon-worker``, ``python -m workers.node``): :func:`main`, then an
    exit that a thread stuck in a blocking call cannot hold up (:func:`exit_within`)."""
    sys.exit(exit_within(main()))


if __name__ == "__main__":
    entry()
