"""Product deletion and platform-key rotation.

- products.deleted_at: set, with the `product_delete` audit row, the moment a delete starts; from then
  on the product no longer authenticates nor shows, its engines are destroyed, and its row goes last
  (webhooks cascade; audit_log has no foreign key, so the trail stays).
- products.delete_owner / delete_deadline: the process (its liveness lock, see lifecycle/owner.py)
  carrying the delete out, until when; no owner, an owner gone, or the deadline passed, and the
  reconciler finishes it (as engines.op_owner / op_deadline for an engine's op).
- products.previous_key_hash / previous_key_expires_at: the key replaced by the last rotation, valid
  until then (Postgres' clock, so every replica agrees); indexed, so authentication stays one lookup.

Revision ID: 0006
Revises: 0005
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

STATEMENTS = [
    "ALTER TABLE products ADD COLUMN deleted_at timestamptz",
    "ALTER TABLE products ADD COLUMN delete_owner integer",
    "ALTER TABLE products ADD COLUMN delete_deadline timestamptz",
    "ALTER TABLE products ADD COLUMN previous_key_hash text",
    "ALTER TABLE products ADD COLUMN previous_key_expires_at timestamptz",
    "CREATE INDEX products_previous_key_hash ON products (previous_key_hash) WHERE previous_key_hash IS NOT NULL",
    "CREATE INDEX products_deleted ON products (deleted_at) WHERE deleted_at IS NOT NULL",
]


def upgrade() -> None:
    for statement in STATEMENTS:
        op.execute(statement)


def downgrade() -> None:
    for statement in [
        "DROP INDEX products_deleted",
        "DROP INDEX products_previous_key_hash",
        "ALTER TABLE products DROP COLUMN previous_key_expires_at",
        "ALTER TABLE products DROP COLUMN previous_key_hash",
        "ALTER TABLE products DROP COLUMN delete_deadline",
        "ALTER TABLE products DROP COLUMN delete_owner",
        "ALTER TABLE products DROP COLUMN deleted_at",
    ]:
        op.execute(statement)
