"""The CST learner: correlation, correlation transformer, heads, checkpoints."""

from fscs.learn.model.cst import (
    CST,
    CSTConfig,
    check_store,
    config_from_store,
    count_parameters,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)

__all__ = [
    "CST",
    "CSTConfig",
    "check_store",
    "config_from_store",
    "count_parameters",
    "load_checkpoint",
    "read_checkpoint",
    "save_checkpoint",
]
