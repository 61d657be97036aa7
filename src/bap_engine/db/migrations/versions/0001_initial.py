"""Initial schema: products, engines, audit_log, rate_leases.

Revision ID: 0001
Revises:
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TABLES = """
CREATE TABLE products (
    id            uuid PRIMARY KEY,
    slug          text NOT NULL UNIQUE,
    display_name  text NOT NULL,
    api_key_hash  text NOT NULL UNIQUE,
    policy        jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE engines (
    id               uuid PRIMARY KEY,
    product_id       uuid NOT NULL REFERENCES products(id) ON DELETE CASCADE,
    user_id          text NOT NULL,
    status           text NOT NULL CHECK (status IN
                       ('provisioning','running','sleeping','stopped','failed','destroying')),
    port             integer UNIQUE,
    url              text,
    ref              text,
    engine_version   text NOT NULL,
    api_key_hash     text NOT NULL,
    engine_key_enc   text NOT NULL,
    sleep_kind       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    last_health_at   timestamptz,
    last_active_at   timestamptz,
    health_failures  integer NOT NULL DEFAULT 0,
    restart_attempts integer NOT NULL DEFAULT 0,
    next_restart_at  timestamptz,
    boot_ms          integer,
    op               text,
    op_owner         integer,
    op_deadline      timestamptz,
    UNIQUE (product_id, user_id)
);
CREATE INDEX engines_product_created ON engines (product_id, created_at, id);
CREATE INDEX engines_status ON engines (status);

CREATE TABLE audit_log (
    id           bigserial PRIMARY KEY,
    timestamp    timestamptz NOT NULL DEFAULT now(),
    product_id   uuid,
    user_id      text,
    engine_id    uuid,
    action       text NOT NULL,
    actor        text NOT NULL DEFAULT 'system',
    metadata     jsonb NOT NULL DEFAULT '{}'::jsonb,
    duration_ms  integer
);
CREATE INDEX audit_log_timestamp ON audit_log (timestamp);
CREATE INDEX audit_log_action ON audit_log (action);
CREATE INDEX audit_log_product_id ON audit_log (product_id, id);
-- admit_denied is coalesced: one row per product, reason and minute.
CREATE UNIQUE INDEX audit_log_admit_denied_minute ON audit_log
    (product_id, (metadata->>'reason'), timestamp) WHERE action = 'admit_denied';

CREATE TABLE rate_leases (
    id          bigserial PRIMARY KEY,
    product_id  uuid NOT NULL,
    granted_at  timestamptz NOT NULL,
    tokens      integer NOT NULL
);
CREATE INDEX rate_leases_product ON rate_leases (product_id, granted_at);
"""

# asyncpg runs one statement per call: tables are split on ';', the function is one statement.
RATE_LEASE_FUNCTION = """
-- Lease admit tokens for a product's rolling-minute rate limit, shared by every replica.
-- A lease usable for lease_s seconds counts in the window for 60 + lease_s seconds, which
-- keeps the limit exact however the tokens are spent inside the lease.
CREATE FUNCTION bap_rate_lease(p_product uuid, p_want integer, p_rpm integer,
                               p_lease_s double precision, p_return_id bigint, p_unused integer)
RETURNS TABLE (lease_id bigint, granted integer, retry_after_s double precision)
LANGUAGE plpgsql AS $$
DECLARE
    span interval := make_interval(secs => 60 + p_lease_s);
    used integer;
    oldest timestamptz;
    n integer;
    new_id bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(7415002, hashtext(p_product::text));
    IF p_return_id IS NOT NULL AND p_unused > 0 THEN
        UPDATE rate_leases SET tokens = GREATEST(tokens - p_unused, 0) WHERE id = p_return_id;
    END IF;
    DELETE FROM rate_leases WHERE product_id = p_product AND granted_at < clock_timestamp() - span;
    SELECT COALESCE(sum(tokens), 0), min(granted_at) FILTER (WHERE tokens > 0)
      INTO used, oldest
      FROM rate_leases WHERE product_id = p_product;
    n := LEAST(p_want, p_rpm - used);
    IF n <= 0 THEN
        RETURN QUERY SELECT NULL::bigint, 0,
            GREATEST(EXTRACT(EPOCH FROM (COALESCE(oldest, clock_timestamp()) + span - clock_timestamp())), 0)
                ::double precision;
        RETURN;
    END IF;
    INSERT INTO rate_leases (product_id, granted_at, tokens)
         VALUES (p_product, clock_timestamp(), n) RETURNING id INTO new_id;
    RETURN QUERY SELECT new_id, n, 0::double precision;
END
$$;
"""


def upgrade() -> None:
    for statement in TABLES.split(";"):
        if statement.strip():
            op.execute(statement)
    op.execute(RATE_LEASE_FUNCTION)


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS bap_rate_lease")
    op.execute("DROP TABLE IF EXISTS rate_leases, audit_log, engines, products")
