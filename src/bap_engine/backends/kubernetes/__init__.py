"""Kubernetes backend (import path `bap_engine.backends.kubernetes`).

    backend.py    KubernetesConfig, KubernetesBackend: the EngineBackend port over the API
    manifests.py  pure builders of the StatefulSet/Service/Secret/PVC bodies and names
    api.py        the kubernetes_asyncio boundary: lazy client, error translation

Only `lifecycle` and the app wiring import it. It never reads the environment.
"""

from bap_engine.backends.kubernetes.backend import KubernetesBackend, KubernetesConfig

__all__ = ["KubernetesBackend", "KubernetesConfig"]
