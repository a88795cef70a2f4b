"""Users: one normal form of the email (email_key) for uniqueness, lookup and login throttling.

Until now accounts were unique on Postgres's lower(email) while the login throttle counted
Python's email.lower(): the two disagree (U+0130 İ), and neither merges lookalikes (fullwidth
letters, ligatures, NFD and NFC, invisible characters), which made separate accounts. From
here on the key is computed in Python by increment_service.emails.email_key, stored in
``email_key`` (unique, not null) and used for everything.

Existing rows are keyed by what their address looks like: format and default-ignorable
characters, refused for new addresses, are dropped first (emails.visible_part), so an account
created as ``bob<ZWSP>@x.co`` logs in as ``bob@x.co``. Where several rows now share a key,
one keeps it: the row the old lookup gave that very address to (lower(email) equal to the
key), else the oldest. The others, and rows whose address has no key at all (private-use or
unassigned characters), are *parked*: their key becomes ``parked <id>``, which no address
normalizes to (keys hold no spaces), so no login or new account reaches them. Nothing is
deleted and a deploy never fails on data; the count is logged, and an operator finds them
with ``SELECT id, email, created_at FROM users WHERE email_key LIKE 'parked %'``.

During a rolling update, replicas older than this migration still insert users without
``email_key``: a trigger gives such a row ``lower(email)`` (the normal form of every ASCII
address), so they keep creating accounts (or answer 409) instead of failing on NOT NULL.

Downgrade restores the unique index on lower(email); it fails if accounts created since
differ only in what lower() folds and the normal form does not (İ and i).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import logging
import uuid

import sqlalchemy as sa
from alembic import op

from increment_service import emails

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

log = logging.getLogger("increment_service.schema")

#: Rows keyed per round trip (keyset pages: memory stays flat however many users there are).
PAGE_ROWS = 5000
PARKED_PREFIX = "parked "

_PAGE = sa.text("SELECT id, email FROM users WHERE id > :after ORDER BY id LIMIT :rows")
_FIRST_PAGE = sa.text("SELECT id, email FROM users ORDER BY id LIMIT :rows")
_SET_KEYS = sa.text(
    "UPDATE users SET email_key = v.key"
    " FROM unnest(CAST(:ids AS uuid[]), CAST(:keys AS text[])) AS v(id, key)"
    " WHERE users.id = v.id"
)
# The first of each key keeps it: the row an exact login found before, else the oldest.
_UNKEY_COLLISIONS = sa.text(
    "UPDATE users SET email_key = NULL FROM ("
    "  SELECT id, row_number() OVER ("
    "    PARTITION BY email_key ORDER BY lower(email) = email_key DESC, created_at, id"
    "  ) AS rank FROM users WHERE email_key IS NOT NULL"
    ") AS ranked WHERE users.id = ranked.id AND ranked.rank > 1"
)
_PARK = sa.text(
    "UPDATE users SET email_key = :prefix || CAST(id AS text) WHERE email_key IS NULL RETURNING id"
)


_OLD_REPLICAS_FUNCTION = """
CREATE FUNCTION users_email_key_for_old_replicas() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.email_key := lower(NEW.email);
    RETURN NEW;
END
$$
"""


def legacy_key(email: str) -> str | None:
    """The key of an address stored before email_key existed, or None if it has none."""
    try:
        return emails.email_key(emails.visible_part(email))
    except emails.InvalidEmail:
        return None


def upgrade() -> None:
    conn = op.get_bind()
    op.add_column("users", sa.Column("email_key", sa.Text, nullable=True))
    after: uuid.UUID | None = None
    while True:
        if after is None:
            rows = conn.execute(_FIRST_PAGE, {"rows": PAGE_ROWS}).all()
        else:
            rows = conn.execute(_PAGE, {"after": after, "rows": PAGE_ROWS}).all()
        if not rows:
            break
        conn.execute(
            _SET_KEYS,
            {"ids": [row.id for row in rows], "keys": [legacy_key(row.email) for row in rows]},
        )
        after = rows[-1].id
    conn.execute(_UNKEY_COLLISIONS)
    parked = len(conn.execute(_PARK, {"prefix": PARKED_PREFIX}).all())
    log.log(
        logging.WARNING if parked else logging.INFO,
        "migration 0003: %d account(s) parked (email_key 'parked <id>'): their address "
        "collides with another account's or has no normal form",
        parked,
        extra={"event": "migration", "parked_users": parked},
    )
    op.alter_column("users", "email_key", nullable=False)
    op.drop_index("users_email_lower_key", table_name="users")
    op.create_index("users_email_key_key", "users", ["email_key"], unique=True)
    op.execute(_OLD_REPLICAS_FUNCTION)
    op.execute(
        "CREATE TRIGGER users_email_key_for_old_replicas BEFORE INSERT ON users"
        " FOR EACH ROW WHEN (NEW.email_key IS NULL)"
        " EXECUTE FUNCTION users_email_key_for_old_replicas()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER users_email_key_for_old_replicas ON users")
    op.execute("DROP FUNCTION users_email_key_for_old_replicas()")
    op.drop_index("users_email_key_key", table_name="users")
    op.drop_column("users", "email_key")
    op.create_index("users_email_lower_key", "users", [sa.text("lower(email)")], unique=True)
