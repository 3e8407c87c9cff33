"""Admin commands (Telegram ids in COCOON_ADMIN_IDS): /stats and /prices."""

from __future__ import annotations

from aiogram.filters import Command
from aiogram.types import Message
from redis.asyncio import Redis as AsyncRedis

from backend import accounts
from backend.db import Database
from backend.settings import Settings
from bot.common import Handlers, price_pair, ton
from bot.i18n import _

handlers = Handlers("admin")


@handlers.message(Command("stats"))
async def cmd_stats(message: Message, db: Database, redis: AsyncRedis) -> None:
    s = await accounts.stats(db, redis)
    depth = ", ".join(f"{model}: {n}" for model, n in sorted(s.queue_depth.items())) or "0"
    await message.answer(
        "\n".join(
            [
                _("Users: {users} ({providers} providers)").format(
                    users=s.users, providers=s.providers
                ),
                _("Answers: {turns} ({day} in the last 24 h)").format(
                    turns=s.turns, day=s.turns_24h
                ),
                _("Paid by users: {volume}; platform revenue: {revenue}").format(
                    volume=ton(s.volume), revenue=ton(s.revenue)
                ),
                _("Workers online: {workers}").format(workers=s.workers_online),
                _("Queue depth: {depth}").format(depth=depth),
                _("Bounds crossed by workers: {flags} (latest: {workers})").format(
                    flags=s.flags, workers=", ".join(s.flagged_workers) or "-"
                ),
            ]
        ),
        parse_mode=None,
    )


@handlers.message(Command("prices"))
async def cmd_prices(message: Message, settings: Settings) -> None:
    lines = [
        _("Prices per 1M tokens (prompt / completion), provider share {share}%:").format(
            share=settings.provider_share_bps / 100
        )
    ]
    for model, price in settings.models.items():
        prompt, completion = price_pair(price)
        lines.append(
            _("{model}: {prompt} / {completion}, context {context} tokens").format(
                model=model, prompt=prompt, completion=completion, context=price.context_length
            )
        )
    lines.append(_("Stars: 1 Star = {rate}").format(rate=ton(settings.stars_nano_per_star)))
    await message.answer("\n".join(lines), parse_mode=None)
