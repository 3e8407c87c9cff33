"""The RQ side of a chat job: how the backend enqueues one, and how the node books it in RQ.

The enqueue contract (backend → worker node):

* queue: ``queue_name(worker_id)`` (``cocoon:queue:<worker_id>``), the worker's own queue;
* serializer: ``rq.serializers.JSONSerializer`` (never pickle);
* function: ``workers.jobs.run_job``, with one positional argument, the sealed request
  (:func:`workers.wire.seal_request`) as a base64 ``str``;
* job meta ``{"max_tokens": N}``: the backend's bound on the reply, in the clear (the sealed
  request carries the client's own ``max_tokens``, which a sealed client chooses and the backend
  cannot read). The node generates at most the smaller of the two (:func:`outer_max_tokens`),
  so the usage it signs stays within what the backend holds and pays for; a job without it
  (an older enqueuer) is bounded by its sealed request alone;
* job id: the wire ``job_id`` (the reply stream is ``cocoon:stream:<job_id>``), built by
  :func:`job_id_for`: ``<worker_id>_<turn>-<attempt>``, so that every key of a job (``rq:job:``,
  ``rq:results:``, ``rq:execution(s):``, ``cocoon:stream:``, ``cocoon:cancel:``) starts with its
  worker's id and a worker's Redis ACL can be limited to its own jobs (README, "Attestation");
* ``ttl``: how long the job may wait in the queue before it is dropped unstarted;
  ``job_timeout``: how long it may run once started; both set by the enqueuer.
* no RQ retries: a failed job is retried by the dispatcher, re-sealed to another worker.

:func:`run_job` is never executed by RQ: the node consumes its queue itself, many jobs at once
(a stock RQ worker runs one job at a time, and only the node holds the key that opens the
request). :class:`workers.job_book.JobBook` does the bookkeeping a stock worker would, so
``rq info``, the job's status, and the started / finished / failed registries tell the truth.

A freshness challenge (the public attestation report, :mod:`backend.attestation.report`) is a
job of its own on the same queue: function ``workers.jobs.answer_challenge``, one argument, the
client's nonce (lower-case hex, not secret), job id ``<worker_id>_ch<hex>-0``. The node answers
it by appending its signature (:func:`workers.receipts.sign_challenge`) in the clear as the
job's one stream entry, so the worker writes no key but its own jobs'.
"""

from __future__ import annotations

import base64
import re
from typing import Any, NoReturn

import redis
from redis.asyncio import Redis as AsyncRedis
from rq import Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from workers.registry import queue_name
from workers.rq_compat import enqueue_commands, offline_queue

__all__ = [
    "CHALLENGE_FUNCTION",
    "JOB_FUNCTION",
    "aenqueue_challenge",
    "aenqueue_job",
    "challenge_argument",
    "enqueue_job",
    "job_id_for",
    "outer_max_tokens",
    "run_job",
]

JOB_FUNCTION = "workers.jobs.run_job"
CHALLENGE_FUNCTION = "workers.jobs.answer_challenge"

RESULT_TTL_S = 300
"""How long RQ keeps a finished job (its data is sealed; the result holds token counts only)."""

FAILURE_TTL_S = 86_400
"""How long RQ keeps a failed job, for ``rq info`` and post-mortems."""

MAX_TOKENS_META = "max_tokens"
"""The job meta key of the backend's bound on the reply (see the module doc)."""

MAX_TOKENS_LIMIT = 1_000_000
"""The largest bound a job may carry (the wire's own limit on ``max_tokens``)."""

_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def job_id_for(worker_id: str, turn_id: str, attempt: int) -> str:
    """``<worker_id>_<turn_id>-<attempt>``; without the worker prefix when the worker's id cannot
    be part of a job id (a development worker named with '.' or too long: attested workers get
    ids that always fit)."""
    prefixed = f"{worker_id}_{turn_id}-{attempt}"
    return prefixed if _JOB_ID.match(prefixed) else f"{turn_id}-{attempt}"


def run_job(sealed_b64: str) -> NoReturn:
    """The job function named in the queue. Only the Cocoon worker node can run it."""
    raise RuntimeError(
        "Cocoon jobs run only on the worker node that owns the queue (`cocoon worker`): "
        "the request is sealed to that node's key. Do not point a stock `rq worker` at it."
    )


def answer_challenge(nonce_hex: str) -> NoReturn:
    """The challenge function named in the queue. Only the worker node answers it."""
    raise RuntimeError("Cocoon challenges are answered by the worker node that owns the queue")


def enqueue_job(
    redis_sync: redis.Redis,
    worker_id: str,
    job_id: str,
    sealed: bytes,
    *,
    timeout_s: int,
    ttl_s: int,
    max_tokens: int | None = None,
) -> Job:
    """Enqueue a sealed request on the worker's own queue (see the module doc for the contract);
    ``max_tokens``: the backend's bound on the reply."""
    queue = Queue(queue_name(worker_id), connection=redis_sync, serializer=JSONSerializer)
    argument = base64.b64encode(sealed).decode("ascii")
    return queue.enqueue_call(
        run_job, **_job_options(argument, job_id, timeout_s, ttl_s, _meta(max_tokens))
    )


def _job_options(
    argument: str, job_id: str, timeout_s: int, ttl_s: int, meta: dict[str, Any] | None
) -> dict[str, Any]:
    """What every Cocoon job is enqueued with (both enqueues, the module doc's contract)."""
    return {
        "args": (argument,),
        "job_id": job_id,
        "timeout": timeout_s,
        "ttl": ttl_s,
        "result_ttl": RESULT_TTL_S,
        "failure_ttl": FAILURE_TTL_S,
        "description": "cocoon chat job",  # RQ's default would repeat the (sealed) argument
        "meta": meta,
    }


def _meta(max_tokens: int | None) -> dict[str, Any] | None:
    if max_tokens is None:
        return None
    if not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        raise ValueError(f"max_tokens must be 1..{MAX_TOKENS_LIMIT}")
    return {MAX_TOKENS_META: max_tokens}


_server_versions: dict[int, tuple[int, int, int]] = {}


def _parse_version(text: str) -> tuple[int, int, int]:
    """``"7.2.4"`` → ``(7, 2, 4)`` (missing parts are 0)."""
    parts = [int(part) for part in text.split(".")[:3]]
    parts += [0] * (3 - len(parts))
    return parts[0], parts[1], parts[2]


async def aenqueue_job(
    redis_async: AsyncRedis,
    worker_id: str,
    job_id: str,
    sealed: bytes,
    *,
    timeout_s: int,
    ttl_s: int,
    max_tokens: int | None = None,
) -> str:
    """:func:`enqueue_job` for asyncio code, in one round trip and no thread.

    RQ builds the job and issues its enqueue commands (:func:`workers.rq_compat.enqueue_commands`);
    they are replayed on ``redis_async`` as one MULTI/EXEC pipeline, so the queue, the job hash
    and RQ's queue set come out exactly as a synchronous ``Queue.enqueue_call`` writes them.
    """
    argument = base64.b64encode(sealed).decode("ascii")
    return await _aenqueue(
        redis_async,
        worker_id,
        job_id,
        run_job,
        argument,
        timeout_s=timeout_s,
        ttl_s=ttl_s,
        meta=_meta(max_tokens),
    )


async def aenqueue_challenge(
    redis_async: AsyncRedis, worker_id: str, job_id: str, nonce_hex: str, *, ttl_s: int
) -> str:
    """Ask the worker to sign ``nonce_hex`` (see the module doc); the answer is the job's
    stream."""
    return await _aenqueue(
        redis_async, worker_id, job_id, answer_challenge, nonce_hex, timeout_s=ttl_s, ttl_s=ttl_s
    )


async def _aenqueue(
    redis_async: AsyncRedis,
    worker_id: str,
    job_id: str,
    func: Any,
    argument: str,
    *,
    timeout_s: int,
    ttl_s: int,
    meta: dict[str, Any] | None = None,
) -> str:
    version = _server_versions.get(id(redis_async))
    if version is None:
        info = await redis_async.info("server")
        version = _parse_version(str(info["redis_version"]))
        _server_versions[id(redis_async)] = version
    queue = offline_queue(queue_name(worker_id), version)
    job = queue.create_job(
        func, **_job_options(argument, job_id, timeout_s, ttl_s, meta), status=JobStatus.QUEUED
    )
    pipe = redis_async.pipeline(transaction=True)
    for name, args, kwargs in enqueue_commands(queue, job):
        getattr(pipe, name)(*args, **kwargs)
    await pipe.execute()
    return job.id


def challenge_argument(job: Job) -> str:
    """The nonce (hex) of a challenge job; ValueError for any other job."""
    args = job.args
    if job.func_name != CHALLENGE_FUNCTION or job.kwargs or len(args) != 1:
        raise ValueError("not a Cocoon challenge")
    if not isinstance(args[0], str) or len(args[0]) > 128:
        raise ValueError("a challenge's nonce is hex, at most 64 bytes")
    return args[0]


def sealed_argument(job: Job) -> bytes:
    """The sealed request carried by a Cocoon job; ValueError for any other job."""
    if job.func_name != JOB_FUNCTION:
        raise ValueError(f"not a Cocoon job: function {job.func_name!r}")
    args, kwargs = job.args, job.kwargs
    if kwargs or len(args) != 1 or not isinstance(args[0], str):
        raise ValueError("a Cocoon job takes exactly one argument: the sealed request (base64)")
    try:
        return base64.b64decode(args[0], validate=True)
    except ValueError as error:
        raise ValueError("the job's sealed request is not valid base64") from error


def outer_max_tokens(job: Job) -> int | None:
    """The backend's bound on the job's reply (its meta), None when the job carries none;
    ValueError for one that is not an integer in 1..:data:`MAX_TOKENS_LIMIT`."""
    meta = job.meta if isinstance(job.meta, dict) else {}
    bound = meta.get(MAX_TOKENS_META)
    if bound is None:
        return None
    if type(bound) is not int or not 1 <= bound <= MAX_TOKENS_LIMIT:
        raise ValueError(f"the job's max_tokens must be an integer 1..{MAX_TOKENS_LIMIT}")
    return bound
