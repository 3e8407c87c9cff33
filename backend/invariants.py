"""The money invariants, checked over a whole database: after a chaos scenario, in tests, or by
an operator (read-only; safe on a live system, though a check during a running turn may see it
half done: pass ``settled=False`` there).

1. The ledger balances: every transaction sums to zero, every balance is the sum of its
   entries, all balances sum to zero (:meth:`Ledger.audit`).
2. No user-side balance (spendable, held, earnings, pending payout) is below zero.
3. Every turn is billed once or fully refunded: each hold was placed by one ``hold``
   transaction and, once closed, closed by exactly one ``settle`` or one ``release``
   transaction that matches its state; a release gives the whole hold back; a settlement never
   charges more than the hold; a usage record exists only for a settled turn.
4. Every TON deposit is credited once: each ledger credit under a chain transaction's key has its
   deposit row with the same amount, and each credited deposit row has exactly that one credit.
5. No payout is paid twice: a payout is confirmed at most once and failed at most once, never
   both, the ledger's confirmations match the payout's state, and at most one of its signed
   messages landed on chain.

With ``settled=True`` (the default) the system is expected at rest: no hold may still be open.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

from sqlalchemy import select

from backend.db import Database
from backend.ledger import USER_SIDE_KINDS, Ledger
from backend.models import (
    Account,
    Entry,
    Hold,
    HoldState,
    Payout,
    PayoutState,
    TonDeposit,
    TonDepositStatus,
    TonMessageState,
    TonPayoutMessage,
    Transaction,
    TurnRecord,
)

__all__ = ["InvariantReport", "check_invariants"]

DEPOSIT_KEY_PREFIX = "ton:"


@dataclass
class InvariantReport:
    """What was checked and what was wrong. ``ok`` when ``violations`` is empty."""

    violations: list[str] = field(default_factory=list)
    holds: int = 0
    holds_open: int = 0
    deposits_credited: int = 0
    payouts_confirmed: int = 0

    @property
    def ok(self) -> bool:
        return not self.violations

    def __str__(self) -> str:
        if self.ok:
            return (
                f"invariants ok: {self.holds} holds ({self.holds_open} open), "
                f"{self.deposits_credited} deposits credited, "
                f"{self.payouts_confirmed} payouts confirmed"
            )
        shown = "\n  ".join(self.violations[:50])
        more = f"\n  ... and {len(self.violations) - 50} more" if len(self.violations) > 50 else ""
        return f"{len(self.violations)} invariant violations:\n  {shown}{more}"


async def check_invariants(db: Database, *, settled: bool = True) -> InvariantReport:
    """Check every invariant of the module doc over ``db``."""
    report = InvariantReport()
    bad = report.violations

    # 1 and 2: the ledger's own audit, and user-side balances.
    audit = await Ledger(db).audit()
    if not audit.ok:
        bad.append(
            f"ledger audit failed: balance sum {audit.balance_sum}, entry sum {audit.entry_sum}, "
            f"unbalanced transactions {audit.unbalanced_transactions[:10]}, "
            f"drifted accounts {audit.drifted_accounts[:10]}, "
            f"negative accounts {audit.negative_accounts[:10]}"
        )

    async with db.session() as session:
        negative = (
            await session.execute(
                select(Account.kind, Account.owner_id, Account.balance).where(
                    Account.kind.in_(USER_SIDE_KINDS), Account.balance < 0
                )
            )
        ).all()
        for kind, owner, balance in negative:
            bad.append(f"{kind} balance of owner {owner} is negative: {balance}")

        transactions = (
            await session.execute(
                select(
                    Transaction.id,
                    Transaction.idempotency_key,
                    Transaction.kind,
                    Transaction.subject_id,
                )
            )
        ).all()
        # Net amount of each transaction per account kind, for the checks below.
        moved: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        owners: dict[int, dict[str, int]] = defaultdict(dict)
        rows = await session.execute(
            select(Entry.transaction_id, Account.kind, Account.owner_id, Entry.amount).join(
                Account, Account.id == Entry.account_id
            )
        )
        for tx_id, kind, owner, amount in rows:
            moved[tx_id][str(kind)] += amount
            owners[tx_id][str(kind)] = owner

        holds = list(await session.scalars(select(Hold)))
        turn_ids = set(await session.scalars(select(TurnRecord.turn_id)))
        deposits = list(await session.scalars(select(TonDeposit)))
        payouts = list(await session.scalars(select(Payout)))
        messages = list(await session.scalars(select(TonPayoutMessage)))

    by_key = {key: (tx_id, kind, subject) for tx_id, key, kind, subject in transactions}
    closing: dict[int, list[tuple[int, str]]] = defaultdict(list)  # hold id -> (tx, kind)
    payout_closing: dict[int, list[str]] = defaultdict(list)
    for tx_id, _key, kind, subject in transactions:
        if kind in ("settle", "release") and subject is not None:
            closing[subject].append((tx_id, kind))
        elif kind in ("payout_confirmed", "payout_failed") and subject is not None:
            payout_closing[subject].append(kind)

    # 3: holds.
    report.holds = len(holds)
    for hold in holds:
        placed = by_key.get(hold.key)
        if placed is None or placed[1] != "hold" or placed[2] != hold.id:
            bad.append(f"hold {hold.key}: no hold transaction placed it")
        elif moved[placed[0]].get("hold") != hold.amount:
            bad.append(f"hold {hold.key}: placed {moved[placed[0]].get('hold')}, not {hold.amount}")
        closed_by = closing.get(hold.id, [])
        if hold.state == HoldState.OPEN:
            report.holds_open += 1
            if settled:
                bad.append(f"hold {hold.key} of user {hold.user_id} is still open")
            if closed_by:
                bad.append(f"hold {hold.key} is open but was closed by {closed_by}")
            continue
        expected = "settle" if hold.state == HoldState.SETTLED else "release"
        if [kind for _tx, kind in closed_by] != [expected]:
            kinds = [kind for _tx, kind in closed_by]
            bad.append(f"hold {hold.key} is {hold.state} but was closed by {kinds or 'nothing'}")
            continue
        tx_id = closed_by[0][0]
        if moved[tx_id].get("hold") != -hold.amount:
            bad.append(f"hold {hold.key}: its {expected} moved {moved[tx_id].get('hold')} out")
        if hold.state == HoldState.RELEASED:
            if moved[tx_id].get("user") != hold.amount:
                bad.append(f"hold {hold.key}: released but the user got {moved[tx_id].get('user')}")
            if hold.key in turn_ids:
                bad.append(f"turn {hold.key} has a usage record but its hold was released")
        else:
            charged = hold.amount - moved[tx_id].get("user", 0)
            if not 0 <= charged <= hold.amount or charged != hold.charged:
                bad.append(
                    f"hold {hold.key}: charged {charged} of {hold.amount} (recorded {hold.charged})"
                )
    hold_keys = {hold.key for hold in holds}
    for turn_id in turn_ids - hold_keys:
        bad.append(f"turn {turn_id} has a usage record but no hold")

    # 4: deposits.
    credited_rows: dict[str, list[TonDeposit]] = defaultdict(list)
    for deposit in deposits:
        credited_rows[deposit.ledger_key].append(deposit)
    for key, (tx_id, kind, _subject) in by_key.items():
        if kind != "deposit" or not key.startswith(DEPOSIT_KEY_PREFIX):
            continue
        rows_for_key = credited_rows.get(key, [])
        if len(rows_for_key) != 1:
            bad.append(f"deposit credit {key} has {len(rows_for_key)} deposit rows")
            continue
        row = rows_for_key[0]
        amount = moved[tx_id].get("user", 0)
        if amount != row.amount:
            bad.append(f"deposit {key}: credited {amount}, the chain says {row.amount}")
        if row.user_id is not None and owners[tx_id].get("user") != row.user_id:
            bad.append(f"deposit {key}: credited to {owners[tx_id].get('user')}, not {row.user_id}")
    for deposit in deposits:
        if deposit.status == TonDepositStatus.CREDITED:
            report.deposits_credited += 1
            found = by_key.get(deposit.ledger_key)
            if found is None or found[1] != "deposit":
                bad.append(
                    f"deposit #{deposit.id} ({deposit.ledger_key}) is marked credited: no credit"
                )
    seen = Counter((d.account, d.lt, d.tx_hash) for d in deposits)
    for chain_tx, n in seen.items():
        if n > 1:
            bad.append(f"chain transaction {chain_tx} recorded {n} times")

    # 5: payouts.
    landed: dict[int, int] = Counter(
        m.payout_id for m in messages if m.state == TonMessageState.LANDED
    )
    for payout in payouts:
        kinds = payout_closing.get(payout.id, [])
        if len(kinds) > 1:
            bad.append(f"payout #{payout.id} was closed {len(kinds)} times: {kinds}")
        if payout.state == PayoutState.CONFIRMED:
            report.payouts_confirmed += 1
            if kinds != ["payout_confirmed"]:
                bad.append(f"payout #{payout.id} is confirmed but the ledger has {kinds}")
        elif payout.state == PayoutState.FAILED:
            if kinds != ["payout_failed"]:
                bad.append(f"payout #{payout.id} is failed but the ledger has {kinds}")
        elif kinds:
            bad.append(f"payout #{payout.id} is {payout.state} but the ledger closed it: {kinds}")
        if landed.get(payout.id, 0) > 1:
            bad.append(f"payout #{payout.id}: {landed[payout.id]} of its messages landed on chain")
    return report
