"""Highload Wallet v3 payouts: batches (one external message, its query id) and their items

Create Date: 2026-12-02
"""


import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"

LIVE = "state IN ('signed', 'sent')"


def upgrade() -> None:
    op.create_table(
        "ton_payout_batches",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("wallet", sa.String(length=80), nullable=False),
        sa.Column("sequence", sa.BigInteger(), nullable=False),
        sa.Column("query_id", sa.Integer(), nullable=False),
        sa.Column("created_at_chain", sa.BigInteger(), nullable=False),
        sa.Column("timeout", sa.Integer(), nullable=False),
        sa.Column("boc", sa.Text(), nullable=False),
        sa.Column("msg_hash", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("send_count", sa.Integer(), nullable=False),
        sa.Column("tx_hash", sa.String(length=64), nullable=True),
        sa.Column("tx_lt", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ton_payout_batches")),
        sa.UniqueConstraint("msg_hash", name=op.f("uq_ton_payout_batches_msg_hash")),
        sa.UniqueConstraint("wallet", "sequence", name="uq_ton_payout_batches_sequence"),
    )
    op.create_index(
        "ix_ton_payout_batches_live",
        "ton_payout_batches",
        ["wallet"],
        unique=True,
        sqlite_where=sa.text(LIVE),
        postgresql_where=sa.text(LIVE),
    )
    op.create_table(
        "ton_payout_batch_items",
        sa.Column("batch_id", sa.Integer(), nullable=False),
        sa.Column("payout_id", sa.Integer(), nullable=False),
        sa.Column("destination", sa.String(length=80), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["batch_id"],
            ["ton_payout_batches.id"],
            name=op.f("fk_ton_payout_batch_items_batch_id_ton_payout_batches"),
        ),
        sa.ForeignKeyConstraint(
            ["payout_id"], ["payouts.id"], name=op.f("fk_ton_payout_batch_items_payout_id_payouts")
        ),
        sa.PrimaryKeyConstraint("batch_id", "payout_id", name=op.f("pk_ton_payout_batch_items")),
    )
    op.create_index(
        op.f("ix_ton_payout_batch_items_payout_id"),
        "ton_payout_batch_items",
        ["payout_id"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_ton_payout_batch_items_payout_id"), table_name="ton_payout_batch_items")
    op.drop_table("ton_payout_batch_items")
    op.drop_index("ix_ton_payout_batches_live", table_name="ton_payout_batches")
    op.drop_table("ton_payout_batches")
