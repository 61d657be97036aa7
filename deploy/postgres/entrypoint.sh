#!/bin/sh
# First start (empty $PGDATA): initdb with POSTGRES_USER (default postgres) as the superuser and
# POSTGRES_PASSWORD as its password, create POSTGRES_DB (default: the user's name), accept password
# (scram-sha-256) connections over TCP from anywhere the container's network lets in, trust the
# container's own unix socket (as the official image does). Then run postgres in the foreground.
# The server is never started during the set-up, so `pg_isready` answers only once it is done.
set -eu
PGDATA=${PGDATA:-/var/lib/postgresql/data}
if [ "${1:-}" = postgres ]; then
    shift
    if [ ! -s "$PGDATA/PG_VERSION" ]; then
        : "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}"
        user=${POSTGRES_USER:-postgres}
        db=${POSTGRES_DB:-$user}
        pwfile=$(mktemp)
        printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
        initdb -D "$PGDATA" -U "$user" --pwfile="$pwfile" -E UTF8 --locale=C.UTF-8 \
            --auth-local=trust --auth-host=scram-sha-256 >/dev/null
        rm -f "$pwfile"
        echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
        echo "listen_addresses = '*'" >>"$PGDATA/postgresql.conf"
        if [ "$db" != postgres ]; then
            echo "CREATE DATABASE \"$db\" OWNER \"$user\";" | postgres --single -D "$PGDATA" postgres >/dev/null
        fi
        echo "bap-postgres: initialised $PGDATA (user $user, database $db)" >&2
    fi
    exec postgres -D "$PGDATA" "$@"
fi
exec "$@"
