"""The schema as SQLAlchemy Core metadata: the model the Alembic migrations in schema/ follow.

The service itself runs plain SQL through asyncpg (see writebehind.py and storage modules);
this metadata is what the migrations are checked against.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import UUID

metadata = sa.MetaData()

counters = sa.Table(
    "counters",
    metadata,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("value", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    # Free space per page: every flush rewrites its rows, which then stay on their page and
    # skip the index (HOT updates). Migration 0002.
    # Keys in byte order, whatever the database's collation: the listing by prefix ranges
    # over it (counters.page). Migration 0007 builds it on (key COLLATE "C"); named here by
    # its column alone, as Alembic reflects it (reflection drops an index column's
    # collation), and tests/test_reads.py checks the collation itself.
    sa.Index("counters_key_c_idx", "key"),
    postgresql_with={"fillfactor": 70},
)

users = sa.Table(
    "users",
    metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    # As the user wrote it: shown back, and where mail would go.
    sa.Column("email", sa.Text, nullable=False),
    sa.Column("password_hash", sa.Text, nullable=False),
    sa.Column(
        "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
    # The email's normal form (increment_service.emails.email_key), computed in Python: one
    # account per key, found by its key, throttled under its key. Migration 0003 gave rows
    # that collide under it 'parked <id>', which no address normalizes to.
    sa.Column("email_key", sa.Text, nullable=False),
    sa.Index("users_email_key_key", "email_key", unique=True),
)

#: API tokens (migration 0006): only the SHA-256 of each token is stored (tokens/).
api_tokens = sa.Table(
    "api_tokens",
    metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column(
        "user_id",
        UUID(as_uuid=True),
        sa.ForeignKey("users.id", ondelete="CASCADE", name="api_tokens_user_id_fkey"),
        nullable=False,
    ),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("scopes", sa.ARRAY(sa.Text), nullable=False),
    sa.Column("token_sha256", sa.LargeBinary, nullable=False),
    sa.Column(
        "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
    # Written in batches (tokens/usage.py), not per request.
    sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
    sa.Index("api_tokens_token_sha256_key", "token_sha256", unique=True),
    sa.Index("api_tokens_user_id_idx", "user_id"),
)

applied_batches = sa.Table(
    "applied_batches",
    metadata,
    sa.Column("replica_id", sa.Text, primary_key=True),
    sa.Column("seq", sa.BigInteger, primary_key=True),
    sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False),
    # Pruning deletes by age.
    sa.Index("applied_batches_applied_at_idx", "applied_at"),
)

#: The ring of partitions of idempotency_keys (migration 0004): a key recorded in time bucket b
#: (epoch // IDEMPOTENCY_TTL_SECONDS) lives in slot b % IDEMPOTENCY_SLOTS.
IDEMPOTENCY_SLOTS = 4


def _idempotency_columns() -> list[sa.Column[object]]:
    return [
        sa.Column("slot", sa.SmallInteger, primary_key=True),
        sa.Column("scope", sa.Text, primary_key=True),
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("bucket", sa.BigInteger, nullable=False),
        sa.Column("fingerprint", sa.LargeBinary, nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        # Migration 0005: the first answer (durable or 202) and the items it did not apply.
        sa.Column("durable", sa.Boolean, nullable=True),
        sa.Column("not_applied", sa.ARRAY(sa.Integer), nullable=True),
        # Migration 0008: the totals of a return=representation answer.
        sa.Column("totals", postgresql.JSONB, nullable=True),
    ]


idempotency_keys = sa.Table(
    "idempotency_keys",
    metadata,
    *_idempotency_columns(),
    postgresql_partition_by="LIST (slot)",
)
# Each partition is a table of its own to Postgres, and to the comparison with the migrations.
idempotency_partitions = [
    sa.Table(f"idempotency_keys_{slot}", metadata, *_idempotency_columns())
    for slot in range(IDEMPOTENCY_SLOTS)
]

batch_rejections = sa.Table(
    "batch_rejections",
    metadata,
    sa.Column("replica_id", sa.Text, primary_key=True),
    sa.Column("seq", sa.BigInteger, primary_key=True),
    sa.Column("keys", sa.ARRAY(sa.Text), nullable=False),
    sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
)

request_rejections = sa.Table(
    "request_rejections",
    metadata,
    sa.Column("replica_id", sa.Text, primary_key=True),
    sa.Column("seq", sa.BigInteger, primary_key=True),
    sa.Column("request", sa.Integer, primary_key=True),
    sa.Column("items", sa.ARRAY(sa.Integer), nullable=False),
    sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
)
