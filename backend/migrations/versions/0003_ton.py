"""TON payments: watcher cursor, deposits, notification outbox, payout messages, ton_proof

Create Date: 2026-11-25
"""

import datetime as dt

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"

LIVE = "state IN ('signed', 'sent')"


def _now() -> sa.Column[dt.datetime]:
    return sa.Column("created_at", sa.DateTime(timezone=True), nullable=False)


def upgrade() -> None:
    op.create_table(
        "ton_cursors",
        sa.Column("account", sa.String(length=80), nullable=False),
        sa.Column("last_lt", sa.BigInteger(), nullable=False),
        sa.Column("last_hash", sa.String(length=64), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("account", name=op.f("pk_ton_cursors")),
    )
    op.create_table(
        "ton_deposits",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("account", sa.String(length=80), nullable=False),
        sa.Column("lt", sa.BigInteger(), nullable=False),
        sa.Column("tx_hash", sa.String(length=64), nullable=False),
        sa.Column("source", sa.String(length=80), nullable=True),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("memo", sa.Text(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("ledger_key", sa.String(length=200), nullable=False),
        sa.Column("utime", sa.BigInteger(), nullable=False),
        _now(),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_ton_deposits_user_id_users")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ton_deposits")),
        sa.UniqueConstraint("account", "lt", "tx_hash", name="uq_ton_deposits_account_lt_hash"),
    )
    op.create_index("ix_ton_deposits_status", "ton_deposits", ["status"], unique=False)
    op.create_table(
        "ton_notifications",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        _now(),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_ton_notifications_user_id_users")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ton_notifications")),
        sa.UniqueConstraint("key", name=op.f("uq_ton_notifications_key")),
    )
    op.create_index(
        op.f("ix_ton_notifications_user_id"), "ton_notifications", ["user_id"], unique=False
    )
    op.create_table(
        "ton_payout_messages",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("payout_id", sa.Integer(), nullable=False),
        sa.Column("wallet", sa.String(length=80), nullable=False),
        sa.Column("seqno", sa.BigInteger(), nullable=False),
        sa.Column("valid_until", sa.BigInteger(), nullable=False),
        sa.Column("boc", sa.Text(), nullable=False),
        sa.Column("msg_hash", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("send_count", sa.Integer(), nullable=False),
        sa.Column("tx_hash", sa.String(length=64), nullable=True),
        sa.Column("tx_lt", sa.BigInteger(), nullable=True),
        _now(),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["payout_id"], ["payouts.id"], name=op.f("fk_ton_payout_messages_payout_id_payouts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ton_payout_messages")),
        sa.UniqueConstraint("msg_hash", name=op.f("uq_ton_payout_messages_msg_hash")),
    )
    op.create_index(
        op.f("ix_ton_payout_messages_payout_id"),
        "ton_payout_messages",
        ["payout_id"],
        unique=False,
    )
    op.create_index(
        "ix_ton_payout_messages_live",
        "ton_payout_messages",
        ["wallet"],
        unique=True,
        sqlite_where=sa.text(LIVE),
        postgresql_where=sa.text(LIVE),
    )
    op.create_table(
        "ton_proof_payloads",
        sa.Column("payload", sa.String(length=64), nullable=False),
        sa.Column("issued_at", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.Column("used_at", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("payload", name=op.f("pk_ton_proof_payloads")),
    )
    op.create_table(
        "ton_wallets",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("purpose", sa.String(length=16), nullable=False),
        sa.Column("address", sa.String(length=80), nullable=False),
        sa.Column("public_key", sa.String(length=64), nullable=False),
        sa.Column("linked_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_ton_wallets_user_id_users")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ton_wallets")),
        sa.UniqueConstraint("user_id", "purpose", name="uq_ton_wallets_user_purpose"),
    )
    op.create_index(op.f("ix_ton_wallets_user_id"), "ton_wallets", ["user_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_ton_wallets_user_id"), table_name="ton_wallets")
    op.drop_table("ton_wallets")
    op.drop_table("ton_proof_payloads")
    op.drop_index("ix_ton_payout_messages_live", table_name="ton_payout_messages")
    op.drop_index(op.f("ix_ton_payout_messages_payout_id"), table_name="ton_payout_messages")
    op.drop_table("ton_payout_messages")
    op.drop_index(op.f("ix_ton_notifications_user_id"), table_name="ton_notifications")
    op.drop_table("ton_notifications")
    op.drop_index("ix_ton_deposits_status", table_name="ton_deposits")
    op.drop_table("ton_deposits")
    op.drop_table("ton_cursors")
