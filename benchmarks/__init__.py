"""Benchmarks: settings and presets, the artifact store, provenance, and the benchmark runners.

Modules (imported explicitly; this package imports nothing at import time):

- ``benchmarks.settings``: :class:`Setting` and the presets ``smoke``, ``quick``, ``cifar2``,
  ``cifar10`` (the one source of truth for sizes).
- ``benchmarks.store``: :class:`ArtifactStore`, content-addressed and atomically written
  artifacts (safetensors, .npy, JSON) with a verified JSON sidecar.
- ``benchmarks.provenance``: git commit, package versions, device and machine, per-stage wall
  time and peak memory.
- ``benchmarks.results``: the result tables and the one JSON record of every run (config,
  setting, provenance, stages, files).
- ``benchmarks.io``: atomic writes, JSON conversion and digests (one copy of each).
"""
