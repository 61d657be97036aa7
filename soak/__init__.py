"""`make soak`: a bounded, self-stopping churn run of two `bap-engine serve` replicas on one
Postgres of its own, with engine kills and one Postgres restart, checking the invariants
(registry = backend, audit rows, ports, quota, shared rate limit, leadership) as it goes.

Modules: config (SOAK_* settings), pg (the Postgres it starts and restarts), procs (/proc:
engine processes, listening sockets, signals), cluster (the replicas and the products),
churn (the clients and their answer log), checks and ledger (the invariants), report
(tables), run (the timeline and the cleanup). Nothing here is imported by the server.
"""
