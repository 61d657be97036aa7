"""Routers, one module per group of endpoints."""
