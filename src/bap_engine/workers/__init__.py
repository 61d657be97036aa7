"""Background workers (health, idle sleep, reconcile), run by the elected leader only."""
