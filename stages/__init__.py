"""One thin CLI module per DVC stage: parse arguments and params, call fscs, write outputs atomically."""
