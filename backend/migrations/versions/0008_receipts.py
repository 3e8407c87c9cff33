"""Receipts: each turn's signed receipt (digests and usage, no text), served to its owner

Create Date: 2026-12-02
"""


import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"


def upgrade() -> None:
    op.create_table(
        "receipts",
        sa.Column("turn_id", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_receipts_user_id_users")),
        sa.PrimaryKeyConstraint("turn_id", name=op.f("pk_receipts")),
    )
    op.create_index("ix_receipts_user_id", "receipts", ["user_id"])


def downgrade() -> None:
    op.drop_index("ix_receipts_user_id", table_name="receipts")
    op.drop_table("receipts")
