"""The config layer: shipped params files validate, choices agree with the library, one default each."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fscs import baselines, metrics, pseudo
from fscs.config import (
    Config,
    PseudoConfig,
    checkpoint_label_size,
    load_config,
    validate,
    validate_section,
)
from fscs.data import episodes, folds
from fscs.errors import FscsError

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", ["params.yaml", "configs/pascal5i.yaml", "configs/coco20i.yaml"])
def test_shipped_params_validate(path):
    config = load_config(ROOT / path)
    raw = yaml.safe_load((ROOT / path).read_text())
    dumped = config.params()
    for name, section in raw.items():
        if name != "train":
            assert {k: dumped[name][k] for k in section} == section  # values as written, no coercion


def test_choices_agree_with_the_library():
    fields = Config.model_fields
    choices = {
        "pseudo.recipe": pseudo.RECIPES,
        "pseudo.dino_heads": pseudo.DINO_HEADS,
        "evaluate.void": metrics.VOID_MODES,
        "folds.order": folds.ORDERS,
        "episodes.too_few_images": episodes.TOO_FEW,
    }
    for dotted, values in choices.items():
        section, key = dotted.split(".")
        model = fields[section].default.__class__
        for v in values:
            validate_section(section, {key: v})
        with pytest.raises(FscsError, match=f"{dotted} = 'nope'"):
            validate_section(section, {key: "nope"})
        assert model.model_fields[key].default in values
    assert Config().evaluate.baselines.names == list(baselines.BASELINES)
    assert Config().evaluate.baselines.presence_stats == list(baselines.STATS)


def test_defaults_match_params_yaml_where_readers_disagreed():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert PseudoConfig().cst_threshold == params["pseudo"]["cst_threshold"]  # was 0.4 in one reader
    assert Config().enhancer.label_size == params["enhancer"]["label_size"]


def test_absent_sections_get_their_defaults_and_required_ones_are_named():
    config = validate({"backbone": {"name": "vit_tiny_random"}})
    assert config.params()["pseudo"] == PseudoConfig().model_dump()
    with pytest.raises(FscsError, match="missing section 'dataset'"):
        config.need("dataset")
    with pytest.raises(FscsError, match="missing key 'dataset.root'"):
        validate({"dataset": {"train_split": "train", "test_split": "val"}})


def test_scalar_where_a_list_is_expected_is_a_one_element_list():
    assert validate({"episodes": {"ways": 2, "shots": 5}}).episodes.ways == [2]


def test_checkpoint_label_size_is_recorded_or_refused():
    assert checkpoint_label_size({"config": {"label_size": 64}}, "c.pt") == 64
    with pytest.raises(FscsError, match="c.pt: checkpoint does not record its label_size"):
        checkpoint_label_size({"config": {}}, "c.pt")
