"""Few-shot prediction on a user's own images (`fscs predict`), outside the DVC graph."""
