"""What each request's answer was, stored with its key and per batch, so that every retry is
told the truth (writebehind/store.py).

``idempotency_keys`` gains two nullable columns, metadata-only changes that are safe while
replicas of the previous version still write the table (a rolling upgrade):

- ``durable``: the first answer was a durable one (``204``/``200``, ``Prefer: durable``). NULL
  or false: it was a ``202``.
- ``not_applied``: the indexes of the request's items that were not applied (their counter
  would have left the 64-bit range). NULL: every item was applied. Rows written before this
  migration are NULL in both, and replay as they did: a 202, everything applied.

``request_rejections`` records, per batch and request (its position in the batch, 1-based),
the items that were not applied, so that a retry of a batch whose commit outcome was unknown
(it finds its id recorded) can still say exactly what was not applied to each request.
Pruned with ``applied_batches``.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("idempotency_keys", sa.Column("durable", sa.Boolean, nullable=True))
    op.add_column("idempotency_keys", sa.Column("not_applied", sa.ARRAY(sa.Integer), nullable=True))
    op.create_table(
        "request_rejections",
        sa.Column("replica_id", sa.Text, primary_key=True),
        sa.Column("seq", sa.BigInteger, primary_key=True),
        sa.Column("request", sa.Integer, primary_key=True),
        sa.Column("items", sa.ARRAY(sa.Integer), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("request_rejections")
    op.drop_column("idempotency_keys", "not_applied")
    op.drop_column("idempotency_keys", "durable")
