"""The worker registry in Redis: who serves which model, how busy, and where a turn should go.

Who writes what. A worker node writes only a key of its own, its entry ``cocoon:worker:<id>``
(:func:`register`, :func:`heartbeat`, :func:`unregister`; they take a ``redis.Redis`` or a
``redis.asyncio.Redis``, and with the asyncio client you await the result). Everything shared
is the backend's: the index ``cocoon:workers`` (:func:`add_to_index` when onboarding accepts a
worker; an id leaves it when the worker is revoked, or when neither its record nor its entry
exists any more), slot reservations (:func:`reserve_slot`, :func:`release_slot`), routes and
attestation records. Only a development node registered directly, with the operator's own
credentials, indexes itself (``register(..., shared=True)``).

The package, one idea a module (every name is importable from ``workers.registry``):
:mod:`~workers.registry.entries` (a worker's entry, the key names, the node's writes),
:mod:`~workers.registry.records` (the backend's attestation records),
:mod:`~workers.registry.reading` (the index and bounded reads),
:mod:`~workers.registry.snapshot` (the dispatcher's copy of the healthy workers) and
:mod:`~workers.registry.slots` (slot reservations, routes, :func:`pick_worker`).
"""

from __future__ import annotations

from workers.registry.entries import (
    DEFAULT_CAPACITY,
    DEFAULT_TTL_S,
    INDEX_KEY,
    WORKER_ID_PATTERN,
    WorkerInfo,
    attestation_key,
    heartbeat,
    queue_name,
    register,
    route_key,
    slots_key,
    unregister,
    valid_worker_id,
    worker_key,
)
from workers.registry.reading import (
    MAX_INDEX_ENTRIES,
    add_to_index,
    get_worker,
    index_ids,
    list_workers,
    queued_jobs,
)
from workers.registry.records import (
    AttestationRecord,
    read_attestation,
    revoke_attestation,
    write_attestation,
)
from workers.registry.slots import pick_worker, release_slot, remember_route, reserve_slot
from workers.registry.snapshot import WorkerSnapshot

__all__ = [
    "DEFAULT_CAPACITY",
    "DEFAULT_TTL_S",
    "INDEX_KEY",
    "MAX_INDEX_ENTRIES",
    "WORKER_ID_PATTERN",
    "AttestationRecord",
    "WorkerInfo",
    "WorkerSnapshot",
    "add_to_index",
    "attestation_key",
    "get_worker",
    "heartbeat",
    "index_ids",
    "list_workers",
    "pick_worker",
    "queue_name",
    "queued_jobs",
    "read_attestation",
    "register",
    "release_slot",
    "remember_route",
    "reserve_slot",
    "revoke_attestation",
    "route_key",
    "slots_key",
    "unregister",
    "valid_worker_id",
    "worker_key",
    "write_attestation",
]
