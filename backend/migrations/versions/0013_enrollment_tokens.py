"""Reusable enrollment tokens: a provider's token that onboards any number of attested workers

Create Date: 2026-12-02
"""


import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"


def upgrade() -> None:
    op.create_table(
        "enrollment_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("provider_id", sa.Integer(), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("onboarded", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["provider_id"], ["users.id"], name=op.f("fk_enrollment_tokens_provider_id_users")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_enrollment_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_enrollment_tokens_token_hash")),
    )
    op.create_index(op.f("ix_enrollment_tokens_provider_id"), "enrollment_tokens", ["provider_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_enrollment_tokens_provider_id"), table_name="enrollment_tokens")
    op.drop_table("enrollment_tokens")
