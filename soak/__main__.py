"""`python -m soak` (what `make soak` runs): see soak/run.py."""

from soak.run import main

main()
