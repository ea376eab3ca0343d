"""Presence relative to reference images: a query's presence log-odds standardised by the log-odds the same
supports give unlabelled images of the query's domain. The checkpoint's absolute threshold is fitted on its
training dataset's validation episodes and moves with the domain; "stands above this domain's typical image"
(> 0) does not need a threshold fitted there (LEARNER.md, presence relative to reference images)."""

from __future__ import annotations

import numpy as np

#: Fewest reference images: the standardisation needs a spread (8 is what the measurements used).
MIN_REFERENCES = 2
#: Added to the references' spread, in log-odds, so identical reference scores do not divide by zero.
SPREAD_FLOOR = 1e-3


def reference_z(query: np.ndarray, references: np.ndarray) -> np.ndarray:
    """(N,) query log-odds, per class, minus the mean of that class's (R, N) reference log-odds, over their
    spread (population std + `SPREAD_FLOOR`): > 0 means the query scores above the domain's typical image."""
    q = np.atleast_1d(np.asarray(query, dtype=np.float64))
    r = np.asarray(references, dtype=np.float64).reshape(-1, q.shape[-1])
    if r.shape[0] < MIN_REFERENCES:
        raise ValueError(f"reference_z needs at least {MIN_REFERENCES} reference rows, got {r.shape[0]}")
    return (q - r.mean(axis=0)) / (r.std(axis=0) + SPREAD_FLOOR)
