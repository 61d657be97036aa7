"""Warm pools, lifecycle events, usage and busy engines.

- engines.pool: a booted engine kept unassigned for its product (its user_id is a reserved
  `_pool.` name no real user id can take); engines.idle_sleep ('auto' | 'never');
  engines.busy (the last probe said the engine works); engines.state_since (when it entered
  its status, for usage).
- audit_log.state: the state an engine entered with this row ('gone' when its row went), so
  usage reads transitions instead of guessing them from action names.
- state_seconds: closed seconds per product and state, kept by a trigger on engines in the
  same transaction as every status change (Prometheus' bap_engine_state_seconds_total adds the
  open intervals of live engines). Pool engines are billed to no one.
- A NOTIFY on every audit row the event stream shows wakes each replica's one listener.

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

STATEMENTS = [
    "ALTER TABLE engines ADD COLUMN pool boolean NOT NULL DEFAULT false",
    "ALTER TABLE engines ADD COLUMN idle_sleep text NOT NULL DEFAULT 'auto' CHECK (idle_sleep IN ('auto', 'never'))",
    "ALTER TABLE engines ADD COLUMN busy boolean NOT NULL DEFAULT false",
    "ALTER TABLE engines ADD COLUMN state_since timestamptz NOT NULL DEFAULT now()",
    "CREATE INDEX engines_pool ON engines (product_id, created_at) WHERE pool",
    "ALTER TABLE audit_log ADD COLUMN state text",
    "CREATE INDEX audit_log_product_user ON audit_log (product_id, user_id, id)",
    "CREATE INDEX audit_log_product_engine ON audit_log (product_id, engine_id, id)",
    "CREATE INDEX audit_log_states ON audit_log (product_id, engine_id, id) WHERE state IS NOT NULL",
    """CREATE TABLE state_seconds (
        product_id  uuid NOT NULL,  -- no foreign key: a product's engines are deleted before it
        state       text NOT NULL,
        seconds     double precision NOT NULL DEFAULT 0,
        PRIMARY KEY (product_id, state)
    )""",
    """CREATE FUNCTION bap_state_seconds() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        -- Close the interval the engine leaves (never for a pool engine: billed to no one).
        IF TG_OP = 'DELETE' OR OLD.status IS DISTINCT FROM NEW.status OR OLD.pool IS DISTINCT FROM NEW.pool THEN
            IF NOT OLD.pool THEN
                INSERT INTO state_seconds AS s (product_id, state, seconds)
                     VALUES (OLD.product_id, OLD.status,
                             GREATEST(EXTRACT(EPOCH FROM (now() - OLD.state_since)), 0))
                ON CONFLICT (product_id, state) DO UPDATE SET seconds = s.seconds + EXCLUDED.seconds;
            END IF;
            IF TG_OP = 'UPDATE' THEN
                NEW.state_since := now();
            END IF;
        END IF;
        IF TG_OP = 'DELETE' THEN
            RETURN OLD;
        END IF;
        RETURN NEW;
    END
    $$""",
    "CREATE TRIGGER engines_state_seconds_update BEFORE UPDATE ON engines "
    "FOR EACH ROW EXECUTE FUNCTION bap_state_seconds()",
    "CREATE TRIGGER engines_state_seconds_delete BEFORE DELETE ON engines "
    "FOR EACH ROW EXECUTE FUNCTION bap_state_seconds()",
    # NOTIFY is delivered at commit; one constant payload is coalesced within a transaction.
    """CREATE FUNCTION bap_notify_event() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('bap_events', '');
        RETURN NULL;
    END
    $$""",
    "CREATE TRIGGER audit_log_notify AFTER INSERT ON audit_log FOR EACH ROW "
    "WHEN (NEW.action NOT IN ('health_check', 'admit_denied')) EXECUTE FUNCTION bap_notify_event()",
]


def upgrade() -> None:
    for statement in STATEMENTS:
        op.execute(statement)


def downgrade() -> None:
    for statement in [
        "DROP TRIGGER audit_log_notify ON audit_log",
        "DROP FUNCTION bap_notify_event",
        "DROP TRIGGER engines_state_seconds_delete ON engines",
        "DROP TRIGGER engines_state_seconds_update ON engines",
        "DROP FUNCTION bap_state_seconds",
        "DROP TABLE state_seconds",
        "DROP INDEX audit_log_states",
        "DROP INDEX audit_log_product_engine",
        "DROP INDEX audit_log_product_user",
        "ALTER TABLE audit_log DROP COLUMN state",
        "DROP INDEX engines_pool",
        "ALTER TABLE engines DROP COLUMN state_since",
        "ALTER TABLE engines DROP COLUMN busy",
        "ALTER TABLE engines DROP COLUMN idle_sleep",
        "ALTER TABLE engines DROP COLUMN pool",
    ]:
        op.execute(statement)
