"""Language chosen: whether the user picked their language with /lang (else it follows the
language of their Telegram app, update by update)

Create Date: 2026-12-02
"""


import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"


def upgrade() -> None:
    op.add_column(
        "users",
        sa.Column("language_chosen", sa.Boolean(), nullable=False, server_default=sa.false()),
    )


def downgrade() -> None:
    # A plain DROP COLUMN (SQLite 3.35+ has it): batch mode would copy the users table, which
    # other tables' foreign keys refuse.
    op.drop_column("users", "language_chosen")
