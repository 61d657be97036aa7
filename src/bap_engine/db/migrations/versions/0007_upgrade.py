"""Engine upgrades: engines.upgrade_to.

- engines.upgrade_to: the `engine_version` an upgrade in flight moves the engine to (the intent,
  recorded before the runtime is touched); NULL otherwise. A crash mid-upgrade leaves it set, and the
  reconciler finishes the upgrade (the engine answers on the new version) or rolls it back to
  `engine_version`, which names the previous version until the upgrade is committed.

Revision ID: 0007
Revises: 0006
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE engines ADD COLUMN upgrade_to text")


def downgrade() -> None:
    op.execute("ALTER TABLE engines DROP COLUMN upgrade_to")
