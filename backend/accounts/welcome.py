"""The welcome credit (issue 17, "a first minute"): what the operator gives each bot user once,
at their first ``/start`` (``COCOON_WELCOME_CREDIT_NANO``, 0 for none), so a newcomer can ask
a first question before topping up. It is a ledger transaction from the operator's account
(like ``cocoon ledger credit``) under one key per user: a second ``/start``, two at once or a
replayed update credit nothing more, and ``/forget`` (which keeps the user's row) gives none
again. Users who came before the operator set it get theirs at their next ``/start``.
"""

from __future__ import annotations

from backend.ledger import Ledger
from backend.ledger_types import IdempotencyConflict
from backend.models import AccountKind
from backend.settings import Settings

REASON = "welcome credit"


def welcome_key(user_id: int) -> str:
    return f"welcome:{user_id}"


async def give_welcome_credit(ledger: Ledger, settings: Settings, user_id: int) -> int:
    """Credit the welcome to ``user_id`` if it never was: the amount credited now, else 0
    (none configured, or given before, even at another amount the operator set then)."""
    amount = settings.welcome_credit_nano
    if amount <= 0:
        return 0
    try:
        receipt = await ledger.credit_deposit(
            user_id, amount, welcome_key(user_id), source=AccountKind.OPERATOR, reason=REASON
        )
    except IdempotencyConflict:  # welcomed before, when the operator's amount was another
        return 0
    return 0 if receipt.replayed else amount
