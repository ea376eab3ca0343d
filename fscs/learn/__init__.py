"""Step 4: the CST learner, its targets per supervision setting, training, threshold calibration
and the episode predictor."""
