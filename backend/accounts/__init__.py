"""What a user or provider sees of their account, shared by the bot, the Mini App and the CLI.

One module per idea:

- :mod:`~backend.accounts.activity`: usage and history (deposits, turns, payouts);
- :mod:`~backend.accounts.stars`: Telegram Stars invoices and credits;
- :mod:`~backend.accounts.welcome`: the welcome credit, once per user;
- :mod:`~backend.accounts.providers`: providers, their workers' states, earnings, withdrawals;
- :mod:`~backend.accounts.admin`: the admin's figures;
- :mod:`~backend.accounts.privacy`: the profile (language, model, referral) and ``/forget``;
- :mod:`~backend.accounts.errors`: :class:`AccountError`, the one refusal.

What to tell a user lives in :mod:`backend.notifications`. Every function takes the services it
needs explicitly; none of them touches prompt or reply text (the database never holds any).
"""

from __future__ import annotations

from backend.accounts.activity import (
    HISTORY_KINDS,
    MAX_PAGE_SIZE,
    HistoryItem,
    HistoryKind,
    HistoryPage,
    UsageRow,
    UsageSummary,
    history,
    usage,
)
from backend.accounts.admin import Stats, stats
from backend.accounts.errors import AccountError
from backend.accounts.privacy import (
    follow_language,
    forget_user,
    set_language,
    set_model,
    set_referrer,
)
from backend.accounts.providers import (
    HEARTBEAT_GRACE_S,
    Earnings,
    WorkerView,
    become_provider,
    earnings,
    provider_workers,
    record_worker,
    watch_workers,
    withdraw,
    withdrawal_refusal,
)
from backend.accounts.stars import (
    MAX_STARS,
    StarsInvoice,
    credit_stars,
    parse_stars_payload,
    stars_invoice,
)
from backend.accounts.welcome import give_welcome_credit

__all__ = [
    "HEARTBEAT_GRACE_S",
    "HISTORY_KINDS",
    "MAX_PAGE_SIZE",
    "MAX_STARS",
    "AccountError",
    "Earnings",
    "HistoryItem",
    "HistoryKind",
    "HistoryPage",
    "StarsInvoice",
    "Stats",
    "UsageRow",
    "UsageSummary",
    "WorkerView",
    "become_provider",
    "credit_stars",
    "earnings",
    "follow_language",
    "forget_user",
    "give_welcome_credit",
    "history",
    "parse_stars_payload",
    "provider_workers",
    "record_worker",
    "set_language",
    "set_model",
    "set_referrer",
    "stars_invoice",
    "stats",
    "usage",
    "watch_workers",
    "withdraw",
    "withdrawal_refusal",
]
