"""Worker flags: the bounds a worker crossed in a turn (billed at the bound, or cut off)

Create Date: 2026-12-02
"""


import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"


def upgrade() -> None:
    op.create_table(
        "worker_flags",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("worker_id", sa.String(length=100), nullable=False),
        sa.Column("provider_id", sa.Integer(), nullable=True),
        sa.Column("turn_id", sa.String(length=200), nullable=False),
        sa.Column("model", sa.String(length=100), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("claimed", sa.BigInteger(), nullable=False),
        sa.Column("bound", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["provider_id"], ["users.id"], name=op.f("fk_worker_flags_provider_id_users")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_worker_flags")),
        sa.UniqueConstraint("turn_id", "kind", name="uq_worker_flags_turn_kind"),
    )
    op.create_index("ix_worker_flags_worker_id", "worker_flags", ["worker_id"])
    op.create_index("ix_worker_flags_created", "worker_flags", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_worker_flags_created", table_name="worker_flags")
    op.drop_index("ix_worker_flags_worker_id", table_name="worker_flags")
    op.drop_table("worker_flags")
