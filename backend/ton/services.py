"""The TON services: the deposit watcher and the payout sender, run together until stopped.

``cocoon watcher`` and ``cocoon ton payouts`` (:mod:`backend.ton.cli`) and ``cocoon up``
(:mod:`backend.stack`, against its local TON Center) run them through :func:`run_services`.
The mnemonic is read from the settings only and is never printed, not even in errors.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, TypedDict

from backend.settings import Settings

if TYPE_CHECKING:
    from backend.ton.wallet import HighloadHotWallet, HotWallet

__all__ = [
    "TonSetupError",
    "deposit_account",
    "highload_wallet",
    "hot_wallet",
    "run_services",
]

log = logging.getLogger("cocoon.ton")


class _Pace(TypedDict):
    """How often both services poll, and how long they back off at most."""

    poll_interval_s: float
    backoff_max_s: float


class TonSetupError(ValueError):
    """A wallet the services need is not configured, or not readable: the message names the
    setting (and never shows its value)."""


def hot_wallet(settings: Settings) -> HotWallet:
    """The payout hot wallet of ``COCOON_TON__HOT_WALLET_MNEMONIC``."""
    from backend.ton.wallet import HotWallet, WalletError

    secret = settings.ton.hot_wallet_mnemonic
    if secret is None or not secret.get_secret_value().strip():
        raise TonSetupError("set COCOON_TON__HOT_WALLET_MNEMONIC (the hot wallet's 24 words) first")
    try:
        return HotWallet.from_mnemonic(secret.get_secret_value())
    except WalletError as error:
        raise TonSetupError(f"COCOON_TON__HOT_WALLET_MNEMONIC: {error}") from None


def highload_wallet(settings: Settings) -> HighloadHotWallet:
    """The Highload Wallet v3 of the same words (``COCOON_TON__HOT_WALLET_KIND=highload_v3``)."""
    from backend.ton.wallet import HighloadHotWallet

    return HighloadHotWallet(hot_wallet(settings).seed, timeout=settings.ton.highload_timeout_s)


def deposit_account(settings: Settings) -> str:
    """The raw address of ``COCOON_TON__DEPOSIT_ADDRESS``, the wallet deposits are watched on."""
    from backend.ton.comment import AddressError, raw_address

    if not settings.ton.deposit_address:
        raise TonSetupError("set COCOON_TON__DEPOSIT_ADDRESS (the service's deposit wallet) first")
    try:
        return raw_address(settings.ton.deposit_address)
    except AddressError as error:
        raise TonSetupError(f"COCOON_TON__DEPOSIT_ADDRESS: {error}") from None


async def run_services(
    settings: Settings,
    *,
    deposits: bool,
    payouts: bool,
    once: bool,
    stop: asyncio.Event | None = None,
) -> int:
    """The deposit watcher and/or the payout sender, until ``stop`` is set (each finishes the
    step it is on: every step is safe to repeat, and a cut one is picked up at the next start)."""
    from backend.db import Database
    from backend.ledger import Ledger
    from backend.ton.highload import HighloadPayoutSender
    from backend.ton.payouts import PayoutSender
    from backend.ton.sending import Step
    from backend.ton.toncenter import TonCenter
    from backend.ton.watcher import DepositWatcher

    ton = settings.ton
    account = deposit_account(settings) if deposits else None
    highload = payouts and ton.hot_wallet_kind == "highload_v3"
    wallet = hot_wallet(settings) if payouts and not highload else None
    batch_wallet = highload_wallet(settings) if highload else None
    db = Database.from_settings(settings)
    ledger = Ledger(db, min_withdrawal=settings.min_withdrawal_nano)
    try:
        async with TonCenter.from_settings(ton) as api:
            pace = _Pace(poll_interval_s=ton.poll_interval_s, backoff_max_s=ton.backoff_max_s)
            watcher: DepositWatcher | None = None
            sender: PayoutSender | HighloadPayoutSender | None = None
            if account:
                watcher = DepositWatcher(
                    db,
                    ledger,
                    api,
                    account,
                    page_size=ton.page_size,
                    usdt_master=ton.usdt_master if ton.takes_usdt else None,
                    usdt_nano_per_micro=ton.usdt_nano_per_micro,
                    **pace,
                )
            if wallet:
                sender = PayoutSender(db, ledger, api, wallet, ttl_s=ton.payout_ttl_s, **pace)
            if batch_wallet:
                sender = HighloadPayoutSender(
                    db, ledger, api, batch_wallet, batch_size=ton.payout_batch_size, **pace
                )
            if once:
                if watcher:
                    total = 0
                    while handled := await watcher.poll_once():
                        total += handled
                    cursor = await watcher.cursor()
                    print(f"deposits: handled {total} transactions; cursor lt {cursor}")
                if sender:
                    step = await sender.step()
                    while step == Step.PROGRESS:
                        step = await sender.step()
                    print(f"payouts: {step.value}")
                return 0
            # A log line (JSON with COCOON_LOG_JSON), like everything a service says.
            log.info(
                "watching %s through %s: deposits %s, payouts %s",
                ton.network,
                ton.base_url,
                "on" if watcher else "off",
                "on" if sender else "off",
            )
            tasks = [t.run(stop) for t in (watcher, sender) if t is not None]
            await asyncio.gather(*tasks)
    finally:
        await db.close()
    return 0
