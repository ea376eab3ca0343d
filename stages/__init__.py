"""One thin CLI module per DVC stage: parse arguments and params, call fscs, write outputs atomically."""

import os

# Before any stage imports torch: idle OpenMP threads sleep instead of spinning. With the default policy a
# core taken by another process (the Prefect server, a second stage) slows the many small ops of CST and
# the enhancer 4-30x; on an idle machine the difference is not measurable.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
