"""fscs: weakly-supervised few-shot classification & segmentation from frozen self-supervised ViTs."""

__version__ = "0.1.0"
