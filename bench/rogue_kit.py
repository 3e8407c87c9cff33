"""What the rogue-worker bench's attacks share (``bench.rogue``): the bench over the network, an
attack's outcome, and the tally of who served the unrouted turns."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from backend.pricing import turn_cost
from tests.support.network import SERVED, Network
from tests.support.rogue import RogueJob, RogueWorker

Plan = Callable[[RogueWorker, RogueJob], Awaitable[None]]


@dataclass
class Outcome:
    attack: str
    succeeded: bool
    figures: str


@dataclass
class Tally:
    """Unrouted turns of the second user: who served them."""

    by: Counter[str] = field(default_factory=Counter)

    def add(self, worker: str) -> None:
        self.by[worker] += 1

    def line(self, honest: str, rogue: str) -> str:
        sent = sum(self.by.values())
        served = self.by[honest]
        failed = {k: v for k, v in self.by.items() if k not in (honest, rogue)}
        share = f"{100 * served / sent:.0f} %" if sent else "-"
        return f"{served}/{sent} by the honest worker ({share}), {self.by[rogue]} by the rogue" + (
            f", failed {dict(failed)}" if failed else ""
        )


class Bench:
    def __init__(self, net: Network, rogue: RogueWorker, bystander_key: str) -> None:
        self.net = net
        self.rogue = rogue
        self.bystander_key = bystander_key
        self.plans: dict[str, Plan] = {}
        self.total = Tally()
        self.price = net.settings.models[SERVED]

    def attack_text(self, plan: Plan, text: str) -> str:
        """A prompt the rogue will answer with ``plan`` (it reads every prompt it serves)."""
        text = f"{text} [{uuid.uuid4().hex[:8]}]"
        self.plans[text] = plan
        return text

    async def behaviour(self, rogue: RogueWorker, job: RogueJob) -> None:
        plan = self.plans.pop(job.request.messages[-1].content, None)
        if plan is None:
            await rogue.answer_honestly(job)
        else:
            await plan(rogue, job)

    def cost(self, prompt: int, completion: int) -> int:
        return turn_cost(
            self.price, prompt_tokens=prompt, cached_prompt_tokens=0, completion_tokens=completion
        )

    async def charged(self, before: int) -> int:
        return before - await self.net.available()

    @contextlib.asynccontextmanager
    async def background(self) -> AsyncIterator[Tally]:
        """Unrouted turns of the second user, one after another, while the block runs."""
        tally = Tally()
        stop = asyncio.Event()

        async def client() -> None:
            while not stop.is_set():
                text = f"background {uuid.uuid4().hex[:6]} turn"
                try:
                    reply = await self.net.chat(text, api_key=self.bystander_key)
                    who = reply.worker or f"{reply.status} {reply.error}"
                except Exception as error:  # the connection itself: counted, never hidden
                    who = type(error).__name__
                tally.add(who)
                self.total.add(who)
                if not who.startswith("w-"):
                    await asyncio.sleep(0.05)

        task = asyncio.create_task(client())
        try:
            yield tally
        finally:
            stop.set()
            await task
