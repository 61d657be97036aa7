"""Database plumbing: connection pool, embedded Postgres, Alembic migrations."""
