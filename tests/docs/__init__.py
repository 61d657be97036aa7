"""Tests of the documentation site (docs/, mkdocs.yml, scripts/gen_docs.py)."""
