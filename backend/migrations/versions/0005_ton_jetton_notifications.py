"""Jetton transfer notifications on the deposit wallet: their amount and sender

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("ton_deposits") as batch:
        batch.add_column(sa.Column("jetton_amount", sa.String(length=40), nullable=True))
        batch.add_column(sa.Column("jetton_sender", sa.String(length=80), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("ton_deposits") as batch:
        batch.drop_column("jetton_sender")
        batch.drop_column("jetton_amount")
