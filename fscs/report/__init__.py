"""Step 6: the study's report, its figures and the offline plots template."""
