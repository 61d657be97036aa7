"""HTTP layer: routes, request models, the error envelope and auth dependencies."""
