"""Step 5: running predictors over fixed episodes, the FS-CS metrics and the training-free baselines."""
