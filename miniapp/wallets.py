"""The Mini App's wallets and top-ups: TON Connect wallets linked by ``ton_proof``, TON and USDT
top-ups as transactions the wallet signs, Telegram Stars invoices. :class:`WalletService` is
the part of :class:`miniapp.service.MiniApp` that does them."""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from sqlalchemy import delete

from backend import accounts
from backend.db import Database
from backend.errors import ErrorCode
from backend.models import TonWallet
from backend.settings import Settings
from backend.ton import proof as ton_proof
from backend.ton.comment import deposit_transaction, friendly_address
from backend.ton.jettons import (
    MAX_USDT_UNITS,
    USDT_DECIMALS,
    format_usdt,
    jetton_topup_transaction,
    usdt_credit,
)
from backend.ton.toncenter import TonCenter, TonCenterError
from miniapp import protocol as p
from miniapp.caller import Caller, MiniAppError, nano, read_amount
from miniapp.texts import N_, translate

if TYPE_CHECKING:
    from aiogram import Bot

TOPUP_PRESETS = ["1", "5", "10", "50"]
STARS_PRESETS = [50, 100, 250, 1000]
USDT_PRESETS = ["5", "10", "25", "100"]


PROOF_REFUSALS = {
    ton_proof.NO_STATE_INIT: N_(
        "your wallet sent no state init and is not deployed yet, so its key cannot be "
        "checked. Make one transfer from this wallet (that deploys it) or update the wallet "
        "app, then link it again."
    ),
    ton_proof.NO_KEY: N_("your wallet's public key cannot be read from the chain."),
    ton_proof.CHAIN_UNAVAILABLE: N_(
        "your wallet's key could not be read from the TON network now. Try again in a minute."
    ),
}


def proof_refusal(language: str, error: ton_proof.ProofError) -> str:
    """Why a wallet's proof was refused: in the caller's language where the refusal has words
    of its own (a missing state init or key), else the verifier's reason."""
    words = PROOF_REFUSALS.get(error.code)
    return translate(language, words) if words else str(error)


class WalletService:
    """Wallets, top-ups and Stars invoices for one caller; the Mini App's service is one."""

    settings: Settings
    db: Database
    bot: Bot | None  # for Stars invoices; None without a bot token

    def _wallet_view(self, wallet: TonWallet | None) -> p.LinkedWallet | None:
        if wallet is None:
            return None
        return p.LinkedWallet(
            address=friendly_address(
                wallet.address, bounceable=False, testnet=self.settings.ton.is_testnet
            ),
            raw=wallet.address,
        )

    # ----------------------------------------------------------------- wallets

    def proof_domains(self, request_host: str | None) -> list[str]:
        """Domains a ton_proof may name: the setting, else the public URL's host; in
        development mode only, the host the page was loaded from."""
        if self.settings.ton.proof_domains:
            return list(self.settings.ton.proof_domains)
        if self.settings.public_url:
            host = urlsplit(self.settings.public_url).netloc
            if host:
                return [host]
        if self.settings.miniapp_dev and request_host:
            return [request_host]
        return []

    async def proof_payload(self) -> p.ProofPayload:
        ttl = self.settings.ton.proof_ttl_s
        return p.ProofPayload(payload=await ton_proof.issue_payload(self.db, ttl), ttl_s=ttl)

    async def link_wallet(
        self, caller: Caller, body: p.LinkWalletRequest, request_host: str | None
    ) -> p.LinkedWallet:
        domains = self.proof_domains(request_host)
        if not domains:
            raise MiniAppError(ErrorCode.PROOF_UNAVAILABLE)
        if body.purpose == "payout" and not caller.user.is_provider:
            raise MiniAppError(ErrorCode.NOT_PROVIDER)
        account_dict = {
            "address": body.account.address,
            "network": body.account.chain,
            "walletStateInit": body.account.walletStateInit,
            "publicKey": body.account.publicKey,
        }
        try:
            wallet = await ton_proof.link_wallet(
                self.db,
                caller.user.id,
                body.purpose,
                account_dict,
                body.proof.model_dump(),
                allowed_domains=domains,
                max_age_s=self.settings.ton.proof_ttl_s,
                network=ton_proof.NETWORKS[self.settings.ton.network],
                chain=ton_proof.toncenter_keys(self.settings.ton),
            )
        except ton_proof.ProofError as error:
            detail = proof_refusal(caller.language, error)
            raise MiniAppError(ErrorCode.PROOF_REFUSED, detail) from None
        view = self._wallet_view(wallet)
        assert view is not None
        return view

    async def unlink_wallet(self, caller: Caller) -> None:
        async with self.db.session() as session, session.begin():
            await session.execute(
                delete(TonWallet).where(
                    TonWallet.user_id == caller.user.id, TonWallet.purpose == "user"
                )
            )

    # ----------------------------------------------------------------- top-ups

    def top_up(self, caller: Caller, amount_text: str) -> p.TopUp:
        ton = self.settings.ton
        if ton.deposit_address is None:
            raise MiniAppError(ErrorCode.TOPUP_UNAVAILABLE)
        amount = read_amount(caller, amount_text)
        request = deposit_transaction(
            ton.deposit_address,
            caller.user.deposit_memo,
            amount,
            ttl_s=ton.deposit_ttl_s,
            testnet=ton.is_testnet,
        )
        return p.TopUp(
            amount=nano(amount),
            memo=caller.user.deposit_memo,
            deposit_address=friendly_address(
                ton.deposit_address, bounceable=False, testnet=ton.is_testnet
            ),
            transaction=p.TonConnectTransaction.model_validate(request),
        )

    async def top_up_usdt(self, caller: Caller, amount_text: str) -> p.UsdtTopUp:
        """The jetton transfer the linked wallet signs: ``amount_text`` USDT from its own USDT
        jetton wallet to the deposit wallet, the memo as the forward comment. Credited at
        the rate in force when the watcher reads it (shown here)."""
        ton = self.settings.ton
        if not ton.takes_usdt or ton.usdt_master is None or ton.deposit_address is None:
            raise MiniAppError(ErrorCode.TOPUP_UNAVAILABLE)
        typed = read_amount(caller, amount_text)  # 9 decimals; USDT has 6
        units, rest = divmod(typed, 10 ** (9 - USDT_DECIMALS))
        credited = usdt_credit(units, ton.usdt_nano_per_micro)
        if rest or units > MAX_USDT_UNITS or credited is None:
            raise MiniAppError(ErrorCode.INVALID_AMOUNT)
        wallet = await ton_proof.linked_wallet(self.db, caller.user.id, "user")
        if wallet is None:
            raise MiniAppError(ErrorCode.INVALID_REQUEST, "connect a wallet first")
        try:
            async with TonCenter.from_settings(ton) as api:
                jetton_wallet = await api.jetton_wallet_address(ton.usdt_master, wallet.address)
        except TonCenterError:
            raise MiniAppError(ErrorCode.TOPUP_UNAVAILABLE) from None
        if jetton_wallet is None:
            raise MiniAppError(ErrorCode.TOPUP_UNAVAILABLE)
        request = jetton_topup_transaction(
            jetton_wallet,
            wallet.address,
            ton.deposit_address,
            caller.user.deposit_memo,
            units,
            ttl_s=ton.deposit_ttl_s,
            testnet=ton.is_testnet,
        )
        return p.UsdtTopUp(
            usdt=format_usdt(units),
            units=str(units),
            amount=nano(credited),
            nano_per_usdt=nano(ton.usdt_nano_per_micro * 10**USDT_DECIMALS),
            memo=caller.user.deposit_memo,
            transaction=p.TonConnectTransaction.model_validate(request),
        )

    async def stars_invoice(self, caller: Caller, stars: int, title: str, label: str) -> str:
        if self.bot is None:
            raise MiniAppError(ErrorCode.STARS_UNAVAILABLE)
        from aiogram.exceptions import TelegramAPIError
        from aiogram.types import LabeledPrice

        try:
            return await self.bot.create_invoice_link(
                title=title,
                description=label,
                # The bot's pre_checkout_query and successful_payment handlers read this:
                # stars:<user id>:<stars>:<rate> (the bot credits it, once per charge id).
                payload=accounts.stars_invoice(caller.user.id, stars, self.settings).payload,
                currency="XTR",
                prices=[LabeledPrice(label=label, amount=stars)],
            )
        except (TelegramAPIError, OSError, TimeoutError):
            raise MiniAppError(ErrorCode.STARS_FAILED) from None

    # --------------------------------------------------------------- addresses

    def _deposit_address(self) -> str | None:
        ton = self.settings.ton
        if ton.deposit_address is None:
            return None
        return friendly_address(ton.deposit_address, bounceable=False, testnet=ton.is_testnet)

    def _address(self, value: object) -> object:
        if not isinstance(value, str) or not value:
            return value
        try:
            return friendly_address(value, bounceable=False, testnet=self.settings.ton.is_testnet)
        except ValueError:
            return value
