"""Engines record their deployment, so workers of one deployment never act on another's rows.

Revision ID: 0003
Revises: 0002
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE engines ADD COLUMN deployment text NOT NULL DEFAULT 'default'")
    op.execute("CREATE INDEX engines_deployment_status ON engines (deployment, status)")


def downgrade() -> None:
    op.execute("DROP INDEX engines_deployment_status")
    op.execute("ALTER TABLE engines DROP COLUMN deployment")
