"""Step 2 of the pipeline: backbones by name, their offline weights, token/attention extraction
and the HDF5 feature store."""
