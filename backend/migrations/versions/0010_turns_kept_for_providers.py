"""Turns kept for providers: a usage record's user may be gone (/forget), so that the provider
who served the turn keeps its statistics while nothing links the turn to the person

Create Date: 2026-12-02
"""


import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"


def upgrade() -> None:
    with op.batch_alter_table("turns") as batch:
        batch.alter_column("user_id", existing_type=sa.Integer(), nullable=True)


def downgrade() -> None:
    op.execute("DELETE FROM turns WHERE user_id IS NULL")  # forgotten users' turns go
    with op.batch_alter_table("turns") as batch:
        batch.alter_column("user_id", existing_type=sa.Integer(), nullable=False)
