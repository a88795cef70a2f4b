"""An index on the counters' keys in byte order, for the listing by prefix.

``GET /api/counters?prefix=`` pages through keys in byte order (the ``C`` collation), whatever
the database's default collation is. The primary key's index is in the default collation: on
a database created with, say, ``en_US.UTF-8`` or an ICU locale it cannot serve a byte-order
range, and the listing would sort the whole table. ``(key COLLATE "C")`` can.

Built ``CONCURRENTLY``: replicas of the previous version keep flushing into ``counters`` while
it is built (a plain CREATE INDEX would block their writes for the whole build). That cannot
run in a transaction block, hence Alembic's ``autocommit_block()``; the migration still runs
under the advisory lock of schema/env.py (a session lock, which outlives the commits), so no
two replicas build it at once.

A concurrent build that fails (a crash, a cancel, a timeout) leaves an INVALID index behind,
which ``IF NOT EXISTS`` would take for done and which Postgres still maintains on every write
but never reads. So an invalid index of this name is dropped first and built again: running
this migration again after any failure finishes the job.

Only the key is indexed, nothing INCLUDEd: a flush rewrites ``value`` and ``updated_at`` of
its rows, and an index holding either would make every such update non-HOT (migration 0002).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

INDEX = "counters_key_c_idx"


def upgrade() -> None:
    with op.get_context().autocommit_block():
        invalid = op.get_bind().scalar(
            sa.text(
                "SELECT NOT i.indisvalid FROM pg_index i"
                " JOIN pg_class c ON c.oid = i.indexrelid"
                " WHERE c.relname = :name AND c.relnamespace = current_schema()::regnamespace"
            ),
            {"name": INDEX},
        )
        if invalid:
            op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {INDEX}")
        op.execute(f'CREATE INDEX CONCURRENTLY IF NOT EXISTS {INDEX} ON counters (key COLLATE "C")')


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {INDEX}")
