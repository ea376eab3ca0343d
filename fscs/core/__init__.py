"""Shared helpers every stage may use: errors, atomic IO, caches, threads, the device rule,
determinism, provenance checks, resampling, IoU and overlays."""
