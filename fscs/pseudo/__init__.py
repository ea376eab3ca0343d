"""Step 3: pixel pseudo-labels from attention, their quality, the labelled subset and the
pseudo-label enhancer."""
