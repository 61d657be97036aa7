"""Engine backends: where engines actually run (processes, containers, pods).

Only `lifecycle` and the app wiring import this package.
"""
