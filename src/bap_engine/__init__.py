"""bap-engine: a control plane that runs one AI-agent engine per user.

Nothing is imported here on purpose: `python -m bap_engine.refengine` must start fast.
"""

__version__ = "0.1.0"
