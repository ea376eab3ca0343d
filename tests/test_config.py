"""The config layer: shipped params files validate, choices agree with the library, one default each."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fscs.config.checkpoint import checkpoint_label_size
from fscs.config.params import (
    Config,
    PseudoConfig,
    load_config,
    validate,
    validate_section,
)
from fscs.core.errors import FscsError
from fscs.data import episodes, folds
from fscs.evaluation import baselines, metrics
from fscs.pseudo import attention as pseudo

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", ["params.yaml", "configs/pascal5i.yaml", "configs/coco20i.yaml"])
def test_shipped_params_validate(path, tmp_path):
    from fscs.config.overrides import merged_params

    if path.startswith("configs/"):  # an override file: its merge onto params.yaml
        merged = tmp_path / "params.yaml"
        merged.write_text(yaml.safe_dump(merged_params(ROOT / path, ROOT / "params.yaml")))
        path = merged
    config = load_config(ROOT / path)
    raw = yaml.safe_load((ROOT / path).read_text())
    for name, section in raw.items():
        if name != "train":
            dumped = getattr(config, name).model_dump()
            assert {k: dumped[k] for k in section} == section  # values as written, no coercion


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
    assert config.pseudo == PseudoConfig()
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


# ---- paper settings as overrides -------------------------------------------------------------------------
def test_overrides_merge_key_by_key_and_replace_lists_and_by_supervision():
    from fscs.config.overrides import merge

    base = {"a": {"x": 1, "y": [1, 2]}, "train": {"lr": 1, "by_supervision": {"image": {"epochs": 2}}}}
    over = {"a": {"y": [3]}, "train": {"by_supervision": {}}, "b": 5}
    assert merge(base, over) == {"a": {"x": 1, "y": [3]}, "train": {"lr": 1, "by_supervision": {}}, "b": 5}
    assert base["a"]["y"] == [1, 2]  # the inputs are left alone


def test_override_of_an_unknown_key_is_refused_before_writing(tmp_path, capsys):
    from fscs.cli import main as cli_main

    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epoch: 3\n")
    out = tmp_path / "params.yaml"
    out.write_text("earlier")
    with pytest.raises(SystemExit) as exc:
        cli_main(["params", "--with", str(bad), "--base", str(ROOT / "params.yaml"), "--out", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {bad} on {ROOT / 'params.yaml'}: params: unknown key 'train.epoch'"), err
    assert out.read_text() == "earlier"


def test_params_command_writes_the_merge(tmp_path):
    from fscs.cli import main as cli_main

    out = tmp_path / "params.yaml"
    cfg = ROOT / "configs" / "pascal5i.yaml"
    cli_main(["params", "--with", str(cfg), "--base", str(ROOT / "params.yaml"), "--out", str(out)])
    merged = load_config(out)
    assert merged.dataset.name == "pascal5i" and merged.train.epochs == 30
    assert merged.enhancer == load_config(ROOT / "params.yaml").enhancer  # defaults kept
