"""The notification outbox is named for what it holds: ``ton_notifications`` → ``notifications``

It carries Stars, payout and worker events as well as TON deposits. Every row is kept; the
primary key, unique key, foreign key, index (and on PostgreSQL the id sequence) take the names
the models' naming convention gives the new table.

Create Date: 2026-12-01
"""


import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"

OLD, NEW = "ton_notifications", "notifications"


def _table(name: str) -> sa.Table:
    """The outbox table as the models define it, under ``name`` (SQLite rebuilds from this)."""
    return sa.Table(
        name,
        sa.MetaData(),
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("data", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=f"pk_{name}"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=f"fk_{name}_user_id_users"),
        sa.UniqueConstraint("key", name=f"uq_{name}_key"),
        sa.Index(f"ix_{name}_user_id", "user_id"),
    )


def _rename(old: str, new: str) -> None:
    op.rename_table(old, new)
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"ALTER SEQUENCE {old}_id_seq RENAME TO {new}_id_seq")
        for kind in ("pk_{}", "uq_{}_key", "fk_{}_user_id_users"):
            op.execute(
                f"ALTER TABLE {new} RENAME CONSTRAINT {kind.format(old)} TO {kind.format(new)}"
            )
        op.execute(f"ALTER INDEX ix_{old}_user_id RENAME TO ix_{new}_user_id")
    else:
        # SQLite keeps constraint names in the table's SQL: rebuild it (rows copied) under the
        # new names; the old index goes with the old table.
        op.drop_index(f"ix_{old}_user_id", table_name=new)
        with op.batch_alter_table(new, recreate="always", copy_from=_table(new)):
            pass


def upgrade() -> None:
    _rename(OLD, NEW)


def downgrade() -> None:
    _rename(NEW, OLD)
