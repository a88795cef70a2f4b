"""Leave room in the counters' pages so a flush's updates are HOT.

Every flush rewrites the rows of the keys it touched. With free space on the page, Postgres
keeps the new row version on the same page and skips the index (a heap-only tuple update):
measured on a 100k-key update-only batch, 16 to 30 % faster. Rows already stored are not
moved; pages written from now on keep 30 % free.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE counters SET (fillfactor = 70)")


def downgrade() -> None:
    op.execute("ALTER TABLE counters RESET (fillfactor)")
