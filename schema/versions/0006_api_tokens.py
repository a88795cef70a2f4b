"""API tokens (RFC 6750 bearer tokens): made by a signed-in user, beside the users.

``api_tokens`` holds no secret: only the SHA-256 of each token (``token_sha256``, unique: the
lookup of the token check), its owner, name, scopes, expiry, and when it was last used
(written in batches, tokens/usage.py). A revoked token's row is deleted; a user's rows go with
the user. A new table only: safe while replicas of the previous version run (a rolling
upgrade).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import UUID

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_tokens",
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
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("api_tokens_token_sha256_key", "api_tokens", ["token_sha256"], unique=True)
    op.create_index("api_tokens_user_id_idx", "api_tokens", ["user_id"])


def downgrade() -> None:
    op.drop_table("api_tokens")
