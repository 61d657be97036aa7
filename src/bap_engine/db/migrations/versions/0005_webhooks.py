"""Webhooks: one receiver per product, fed with its lifecycle events (the audit rows GET /events shows).

- webhooks.secret_enc: the signing secret sealed with the master key (Fernet, as engine keys are);
  the plaintext is shown once, by the PUT that made it, and is never stored.
- webhooks.cursor_id: the last audit id acknowledged (or given up); a new webhook starts at the
  largest audit id of its creation, so it is sent the events that follow it.
- webhooks.deployment: the deployment whose leader delivers it (the one that served its PUT), as
  engines.deployment: leaders of other deployments on the same database leave it alone.
- attempts / next_attempt_at / first_failure_at: the backoff of the event at the head (the first
  deliverable row after cursor_id); last_status / last_delivery_at / last_error: the last attempt.

Revision ID: 0005
Revises: 0004
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

STATEMENTS = [
    """CREATE TABLE webhooks (
        product_id        uuid PRIMARY KEY REFERENCES products(id) ON DELETE CASCADE,
        url               text NOT NULL,
        secret_enc        text NOT NULL,
        deployment        text NOT NULL DEFAULT 'default',
        created_at        timestamptz NOT NULL DEFAULT now(),
        updated_at        timestamptz NOT NULL DEFAULT now(),
        cursor_id         bigint NOT NULL,
        attempts          integer NOT NULL DEFAULT 0,
        next_attempt_at   timestamptz,
        first_failure_at  timestamptz,
        last_status       integer,
        last_delivery_at  timestamptz,
        last_error        text
    )""",
]


def upgrade() -> None:
    for statement in STATEMENTS:
        op.execute(statement)


def downgrade() -> None:
    op.execute("DROP TABLE webhooks")
