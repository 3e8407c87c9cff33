"""The refusal of the account layer: one error class, its codes in :class:`ErrorCode`."""

from __future__ import annotations

from backend.errors import CocoonError

__all__ = ["AccountError"]


class AccountError(CocoonError):
    """A request the account layer refuses. ``code`` is stable; ``str()`` is readable.

    Codes: ``not_provider``, ``no_payout_wallet``, ``below_minimum``, ``insufficient_funds``,
    ``invalid_amount``, ``invalid_page``.
    """
