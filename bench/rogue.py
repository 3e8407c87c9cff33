"""The rogue-worker suite's long form (issue 12, item 8): each attack of
``tests/test_rogue_workers.py`` at full size against ``cocoon up``'s network, with figures; then
the attacks tried, the attacks that succeeded (must be 0), and the honest worker's share of turns.

``.venv/bin/python -m bench.rogue [--flood-mb 300] [--bogus 300000] [--trickle-s 30]``

It replaces ``bench.reply_bounds``: the reply path's figures (an inflated final record, a
300 MB reply to ``max_tokens: 1``, a trickle) are its first attacks, now with an onboarded rogue.

The network is the suite's (``tests/support/network.py``), on a redis-server of its own on a
free port (the last attack restarts it; nothing else is touched): ``cocoon web`` in this
process, an honest node process (the instant engine) and one rogue (``tests/support/rogue.py``),
both onboarded through the onboarding HTTP API with development-TEE evidence, each with its own
Redis ACL user. The rogue attacks the turns of one user, routed to it as a conversation's
earlier turn would route them; every other job it gets it answers as an honest node would.
Meanwhile a second user sends turns that nobody routes, one after another (four at once during
the restart): the honest worker's share of those is the figure that editing the index or
advertising a huge capacity used to bring to nothing (with two workers serving, a fair share is
about half). After each attack the ledger audit (``backend/invariants.py``) runs once every turn
has settled; an attack after which it is not clean counts as succeeded.

An attack succeeds when: inflated counts are billed above the backend's bound; a reply to
``max_tokens: 1`` gets the client more than the turn's text bound, costs more than what was
delivered, or grows this process by more than 64 MB; an endless reply is not cut off at its
chunk bound; a trickle holds its turn past the deadline (job timeout 4 s, first token 2 s here:
7 s) by more than 2 s; evidence claiming an off-machine engine or unlisted weights is accepted
(an off-machine engine with the development TEE must be labelled); any shared-state command of
the rogue's runs, or an unrouted turn fails meanwhile; the rogue gets more slots than its
attestation record's capacity; a Redis restart ends the node, answers 500, or leaves the
network serving nothing. Figures that are times are this machine's, printed to compare runs,
and decide nothing but the trickle.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

from backend.settings import Settings
from bench.rogue_kit import Bench, Outcome, Tally
from bench.rogue_reply import (
    endless_reply,
    inflated_counts,
    off_machine_engine,
    oversized_reply,
    trickle,
    unlisted_weights,
)
from bench.rogue_state import edit_index, flood_index, huge_capacity, redis_restart, scripts, select
from tests.support.network import Network, network
from tests.support.redis_server import RedisServer


async def main(flood_mb: int, bogus: int, trickle_s: float) -> int:
    # The network's own warnings (Redis unreachable during the restart, flags, cut-offs) are
    # what the figures count; only errors are printed as they happen.
    logging.basicConfig(level=logging.ERROR, format="%(name)s: %(message)s")
    if shutil.which("redis-server") is None:
        print("bench.rogue needs redis-server (Debian: apt install redis-server)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="cocoon-bench-rogue-") as tmp:
        server = RedisServer(Path(tmp) / "redis")
        server.start()
        try:
            settings = Settings(_env_file=None, data_dir=Path(tmp) / "data", redis_url=server.url())
            async with network(settings, Path(tmp) / "net") as net:
                return await run(net, server, flood_mb, bogus, trickle_s)
        finally:
            server.stop()


async def run(
    net: Network, server: RedisServer, flood_mb: int, bogus: int, trickle_s: float
) -> int:
    rogue = await net.rogue(capacity=64)  # what the honest node claims (cocoon up's default)
    _bystander, key = await net.user(9100)
    b = Bench(net, rogue, key)
    stop = asyncio.Event()
    serving = asyncio.create_task(rogue.serve(b.behaviour, stop))
    attacks: list[Callable[[], Awaitable[Outcome]]] = [
        lambda: inflated_counts(b),
        lambda: oversized_reply(b, flood_mb),
        lambda: endless_reply(b),
        lambda: trickle(b, trickle_s),
        lambda: off_machine_engine(b),
        lambda: unlisted_weights(b),
        lambda: edit_index(b),
        lambda: flood_index(b, bogus),
        lambda: scripts(b),
        lambda: select(b),
        lambda: huge_capacity(b),
    ]
    outcomes = []
    print(f"honest worker {net.honest_id}, rogue {rogue.worker_id} (both onboarded, dev TEE)")
    try:
        for attack in attacks:
            async with b.background() as tally:
                outcome = await attack()
            outcomes.append(await report(b, outcome, tally))
        tally = Tally()
        outcomes.append(await report(b, await redis_restart(b, server, tally), tally))
    finally:
        stop.set()
        await serving
    succeeded = [o.attack for o in outcomes if o.succeeded]
    print(f"\nattacks tried: {len(outcomes)}")
    print(
        f"attacks that succeeded: {len(succeeded)}"
        + (f" ({', '.join(succeeded)})" if succeeded else "")
    )
    print(
        "the honest worker's share of unrouted turns, all attacks: "
        + b.total.line(net.honest_id, rogue.worker_id)
        + " (two workers claiming the same capacity serve them: a fair share is about half)"
    )
    return 1 if succeeded else 0


async def report(b: Bench, outcome: Outcome, tally: Tally) -> Outcome:
    audit = await b.net.audit()
    if not audit.ok:
        outcome.succeeded = True
    verdict = "SUCCEEDED" if outcome.succeeded else "failed"
    print(f"\n{outcome.attack}: {verdict}\n  {outcome.figures}")
    print(f"  unrouted turns meanwhile: {tally.line(b.net.honest_id, b.rogue.worker_id)}")
    print(f"  ledger audit: {'clean' if audit.ok else audit}")
    sys.stdout.flush()
    return outcome


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flood-mb", type=int, default=300, help="the oversized reply, in MB")
    parser.add_argument("--bogus", type=int, default=300_000, help="bogus index ids")
    parser.add_argument("--trickle-s", type=float, default=30.0, help="how long it trickles")
    options = parser.parse_args()
    sys.exit(asyncio.run(main(options.flood_mb, options.bogus, options.trickle_s)))
