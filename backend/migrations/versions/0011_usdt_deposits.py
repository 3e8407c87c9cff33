"""USDT deposits: the world account they come from, and on the deposit row the jetton master,
the rate it was credited at and the nanoTON credited

Create Date: 2026-12-02
"""


import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"

WORLD = "'ton_in', 'ton_out', 'stars_in', 'operator'"
WORLD_WITH_USDT = "'ton_in', 'ton_out', 'stars_in', 'usdt_in', 'operator'"


def _overdraft_check(kinds: str) -> None:
    with op.batch_alter_table("accounts") as batch:
        batch.drop_constraint(op.f("ck_accounts_no_overdraft"), type_="check")
        batch.create_check_constraint(
            op.f("ck_accounts_no_overdraft"), sa.text(f"balance >= 0 OR kind IN ({kinds})")
        )


def upgrade() -> None:
    _overdraft_check(WORLD_WITH_USDT)
    op.execute("INSERT INTO accounts (kind, owner_id, balance) VALUES ('usdt_in', 0, 0)")
    with op.batch_alter_table("ton_deposits") as batch:
        batch.add_column(sa.Column("jetton_master", sa.String(length=80), nullable=True))
        batch.add_column(sa.Column("nano_per_unit", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("credited", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    used = sa.text(
        "SELECT 1 FROM accounts WHERE kind = 'usdt_in' AND (balance <> 0 OR id IN "
        "(SELECT account_id FROM ledger_entries))"
    )
    if op.get_bind().execute(used).first():
        raise RuntimeError("USDT has been credited: its ledger account cannot be downgraded away")
    with op.batch_alter_table("ton_deposits") as batch:
        batch.drop_column("credited")
        batch.drop_column("nano_per_unit")
        batch.drop_column("jetton_master")
    op.execute("DELETE FROM accounts WHERE kind = 'usdt_in'")
    _overdraft_check(WORLD)
