"""Chaos: the money stays right while processes die, connections drop and services restart.

``.venv/bin/python -m bench.chaos`` (long form, by hand; ``--help`` for sizes) runs every
scenario against real Redis, real worker node processes, a real database and a local TON
Center, injects faults at random moments, then checks the invariants of
:mod:`backend.invariants` (ledger balanced, no negative user balance, every turn billed once or
fully refunded, every deposit credited once, no payout paid twice) and prints figures:
scenarios run, faults injected, invariant violations. ``tests/test_chaos.py`` is the short form.

Scenarios:

- ``worker-kills``: chat turns while worker node processes are SIGKILLed at random moments and
  replaced (instant engine);
- ``watcher-kills``: the deposit watcher killed at random moments (task cancelled at any await,
  or crashing between crediting and recording) during a backlog of deposits, and restarted;
  the first half reaches a deposit wallet never deployed (``uninit``: non-bounceable
  transfers are aborted and kept, bounceable ones bounce back), the rest the deployed wallet,
  and a few recent ones become visible only after higher ones were read;
- ``payout-kills``: the payout sender killed after signing, after sending and before confirming,
  over and over, with lost messages;
- ``redis-restart``: a private Redis killed and restarted while turns stream;
- ``postgres-drops``: PostgreSQL backends terminated (``pg_terminate_backend``) while ledger
  operations run, each retried under its idempotency key as callers do;
- ``web-restart``: ``cocoon web`` SIGKILLed while turns stream through it, restarted; the holds
  its dead turns left are released by the sweeper.
"""

from __future__ import annotations

from bench.chaos.common import Crash, Figures
from bench.chaos.payout_kills import payout_kills
from bench.chaos.postgres_drops import postgres_drops
from bench.chaos.redis_restarts import redis_restarts
from bench.chaos.watcher_kills import watcher_kills
from bench.chaos.web_restarts import web_restarts
from bench.chaos.worker_kills import worker_kills

__all__ = [
    "Crash",
    "Figures",
    "payout_kills",
    "postgres_drops",
    "redis_restarts",
    "watcher_kills",
    "web_restarts",
    "worker_kills",
]
