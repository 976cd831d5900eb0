"""API key names: unique among the active keys of the same prefix (was: of all prefixes).

A name taken outside an admin's prefix must not be refused to it (that would tell it which
names exist there), so two tenants may both have a key named `gateway`. Log lines and rate
limits therefore go by the key's id, which is never reused.

Revision ID: 0005
Revises: 0003
Create Date: 2026-12-01
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("DROP INDEX api_keys_active_name")
    op.execute("CREATE UNIQUE INDEX api_keys_active_prefix_name"
               " ON api_keys (coalesce(device_prefix, ''), name) WHERE revoked_at IS NULL")


def downgrade() -> None:
    # Fails while two active keys share a name: revoke one of them first.
    op.execute("DROP INDEX api_keys_active_prefix_name")
    op.execute("CREATE UNIQUE INDEX api_keys_active_name ON api_keys (name)"
               " WHERE revoked_at IS NULL")
