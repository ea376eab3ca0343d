"""Prefect flows that run the DVC stages as tasks (DVC decides what is stale; Prefect shows it)."""
