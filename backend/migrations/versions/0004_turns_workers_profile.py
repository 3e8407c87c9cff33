"""Usage records of settled turns, durable worker records, user profile fields, outbox data

Create Date: 2026-11-25
"""


import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"


def upgrade() -> None:
    op.create_table(
        "turns",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("turn_id", sa.String(length=200), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("model", sa.String(length=100), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("cached_prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("cost", sa.BigInteger(), nullable=False),
        sa.Column("provider_id", sa.Integer(), nullable=True),
        sa.Column("provider_earned", sa.BigInteger(), nullable=False),
        sa.Column("worker_id", sa.String(length=100), nullable=True),
        sa.Column("tee", sa.String(length=32), nullable=True),
        sa.Column("finish_reason", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_turns_user_id_users")),
        sa.ForeignKeyConstraint(
            ["provider_id"], ["users.id"], name=op.f("fk_turns_provider_id_users")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_turns")),
        sa.UniqueConstraint("turn_id", name=op.f("uq_turns_turn_id")),
    )
    op.create_index("ix_turns_user_created", "turns", ["user_id", "created_at"])
    op.create_index("ix_turns_worker_id", "turns", ["worker_id"])
    op.create_index("ix_turns_provider_id", "turns", ["provider_id"])
    op.create_table(
        "workers",
        sa.Column("worker_id", sa.String(length=100), nullable=False),
        sa.Column("provider_id", sa.Integer(), nullable=True),
        sa.Column("model", sa.String(length=100), nullable=True),
        sa.Column("tee", sa.String(length=32), nullable=True),
        sa.Column("image", sa.String(length=200), nullable=True),
        sa.Column("mrtd", sa.String(length=96), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("attested_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["provider_id"], ["users.id"], name=op.f("fk_workers_provider_id_users")
        ),
        sa.PrimaryKeyConstraint("worker_id", name=op.f("pk_workers")),
    )
    op.create_index("ix_workers_provider_id", "workers", ["provider_id"])
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("referrer", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("model", sa.String(length=100), nullable=True))
        batch.add_column(
            sa.Column("is_provider", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    with op.batch_alter_table("ton_notifications") as batch:
        batch.add_column(sa.Column("data", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("ton_notifications") as batch:
        batch.drop_column("data")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("is_provider")
        batch.drop_column("model")
        batch.drop_column("referrer")
    op.drop_index("ix_workers_provider_id", table_name="workers")
    op.drop_table("workers")
    op.drop_index("ix_turns_provider_id", table_name="turns")
    op.drop_index("ix_turns_worker_id", table_name="turns")
    op.drop_index("ix_turns_user_created", table_name="turns")
    op.drop_table("turns")
