"""Idempotency keys, expired by truncating a partition, and the rejections of a batch.

``idempotency_keys`` records the Idempotency-Key of every request applied (per scope: a user,
or the open routes), in the same statement as the increments it carries (writebehind.py). It
is LIST-partitioned on ``slot``, four partitions used as a ring: a key recorded in time bucket
``b`` (``floor(epoch / IDEMPOTENCY_TTL_SECONDS)``) goes to slot ``b % 4``; lookups look at the
current bucket and the one before, so a key is remembered for one to two TTLs; a partition
two buckets behind is emptied with TRUNCATE, in O(1), never with a large DELETE. Every row
carries its bucket, so a partition not yet emptied is never mistaken for a recent one.

``batch_rejections`` keeps, per batch id, the counter keys a batch could not apply (the total
would have left bigint). A retry after an ambiguous commit finds its batch applied: this is
where it reads what was rejected, so a durable answer can still say which items were not
applied.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

SLOTS = 4


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE idempotency_keys (
            slot smallint NOT NULL,
            scope text NOT NULL,
            key text NOT NULL,
            bucket bigint NOT NULL,
            fingerprint bytea NOT NULL,
            recorded_at timestamptz NOT NULL,
            CONSTRAINT idempotency_keys_pkey PRIMARY KEY (slot, scope, key)
        ) PARTITION BY LIST (slot)
        """
    )
    for slot in range(SLOTS):
        op.execute(
            f"CREATE TABLE idempotency_keys_{slot} PARTITION OF idempotency_keys"
            f" FOR VALUES IN ({slot})"
        )
    op.create_table(
        "batch_rejections",
        sa.Column("replica_id", sa.Text, primary_key=True),
        sa.Column("seq", sa.BigInteger, primary_key=True),
        sa.Column("keys", sa.ARRAY(sa.Text), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("batch_rejections")
    op.execute("DROP TABLE idempotency_keys")  # and its partitions
