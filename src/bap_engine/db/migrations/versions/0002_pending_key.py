"""A rotation's new key is recorded before the engine is told, so a crash mid-rotation is finished.

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE engines ADD COLUMN pending_key_enc text")


def downgrade() -> None:
    op.execute("ALTER TABLE engines DROP COLUMN pending_key_enc")
