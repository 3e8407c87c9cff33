"""Jetton transfer notifications on the deposit wallet: their amount and sender

Create Date: 2026-12-01
"""


import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"


def upgrade() -> None:
    with op.batch_alter_table("ton_deposits") as batch:
        batch.add_column(sa.Column("jetton_amount", sa.String(length=40), nullable=True))
        batch.add_column(sa.Column("jetton_sender", sa.String(length=80), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("ton_deposits") as batch:
        batch.drop_column("jetton_sender")
        batch.drop_column("jetton_amount")
