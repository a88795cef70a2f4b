"""The totals a durable request asked for (``Prefer: durable, return=representation``), kept
with its Idempotency-Key so that every replay answers the same totals (writebehind/store.py).

``idempotency_keys.totals``: nullable JSON, ``[[counter key, running total], ...]``, the
counters in the order the request's items first name them; their time is the record's
``recorded_at`` (the same commit). NULL: the first answer carried no totals. A metadata-only
change, safe while replicas of the previous version write the table (a rolling upgrade).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("idempotency_keys", sa.Column("totals", postgresql.JSONB, nullable=True))


def downgrade() -> None:
    op.drop_column("idempotency_keys", "totals")
