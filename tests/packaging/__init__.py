"""Packaging tests: the client distribution, the generated sync client, and the built server dists."""
