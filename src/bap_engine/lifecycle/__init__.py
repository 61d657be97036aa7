"""Lifecycle: the engine state machine, and the only layer that calls a backend.

Workers reach backend types through here (re-exported below)."""

from bap_engine.backends.base import BackendError, Observed, ObservedState
from bap_engine.lifecycle.clock import now
from bap_engine.lifecycle.engine_settings import IDLE_SLEEP_VALUES, record_busy, set_idle_sleep
from bap_engine.lifecycle.lifecycle import Lifecycle
from bap_engine.lifecycle.probe import Probe, probe_health, probe_status
from bap_engine.lifecycle.products import destroy_product_engines, finish_product_deletes, remove_deleted_product
from bap_engine.lifecycle.views import EngineView, view

__all__ = ["Lifecycle", "EngineView", "view", "probe_health", "now", "Observed", "ObservedState", "BackendError",
           "Probe", "probe_status", "record_busy", "set_idle_sleep", "IDLE_SLEEP_VALUES", "destroy_product_engines",
           "remove_deleted_product", "finish_product_deletes"]
