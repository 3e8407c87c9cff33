"""SQL tables. Money columns are 64-bit integers of nanoTON; no floats anywhere.

Every schema change goes through an Alembic migration in ``backend/migrations/versions``. The
tables live by idea in this package's modules (users and the ledger, TON, workers, turns, the
notification outbox); every name is re-exported here, so ``from backend.models import X`` and
``Base.metadata`` (all tables) keep working.
"""

from backend.models.accounts import (
    WORLD_KINDS,
    Account,
    AccountKind,
    ApiKey,
    Entry,
    Hold,
    HoldState,
    Payout,
    PayoutState,
    Transaction,
    User,
)
from backend.models.base import NAMING, Base, UTCDateTime, utcnow
from backend.models.notifications import Notification
from backend.models.ton import (
    TonCursor,
    TonDeposit,
    TonDepositStatus,
    TonMessageState,
    TonPayoutBatch,
    TonPayoutBatchItem,
    TonPayoutMessage,
    TonPayoutStage,
    TonProofPayload,
    TonWallet,
)
from backend.models.turns import TurnReceipt, TurnRecord
from backend.models.workers import EnrollmentToken, WorkerFlag, WorkerRecord, WorkerState

__all__ = [
    "NAMING",
    "WORLD_KINDS",
    "Account",
    "AccountKind",
    "ApiKey",
    "Base",
    "EnrollmentToken",
    "Entry",
    "Hold",
    "HoldState",
    "Notification",
    "Payout",
    "PayoutState",
    "TonCursor",
    "TonDeposit",
    "TonDepositStatus",
    "TonMessageState",
    "TonPayoutBatch",
    "TonPayoutBatchItem",
    "TonPayoutMessage",
    "TonPayoutStage",
    "TonProofPayload",
    "TonWallet",
    "Transaction",
    "TurnReceipt",
    "TurnRecord",
    "UTCDateTime",
    "User",
    "WorkerFlag",
    "WorkerRecord",
    "WorkerState",
    "utcnow",
]
