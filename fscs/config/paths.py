"""The pipeline's file names for one dataset, as dvc.yaml passes them to the stages: for code that runs a
study step outside DVC (experiments, benchmarks). tests/test_project.py checks they match dvc.yaml."""

from __future__ import annotations


def pipeline_paths(dataset: str) -> dict[str, str]:
    """{input name: path} of the train and evaluate stages' files for ``dataset`` (``dataset.name``)."""
    return {
        "index": f"data/index/{dataset}.parquet",
        "folds": f"data/episodes/{dataset}/folds.json",
        "episodes": f"data/episodes/{dataset}",
        "features": f"data/features/{dataset}.h5",
        "pseudo": f"data/pseudo/{dataset}.h5",
        "enhanced": f"data/pseudo/{dataset}-enhanced.h5",
        "enhancer": "models/enhancer.pt",
    }
