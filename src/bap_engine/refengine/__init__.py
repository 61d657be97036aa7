"""The reference engine: a real, small engine program that honours the Engine contract.

Started as ``python -m bap_engine.refengine``; never imported by the rest of bap_engine (an
import-linter contract forbids it), and it imports nothing of bap_engine either. It uses only the
standard library and ``h11``, so the process is healthy within a few tens of milliseconds.
"""
