"""`fscs predict`: errors before output, and end to end with a tiny checkpoint on the tiny random ViT."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from PIL import Image

from fscs.cli import main as cli_main
from fscs.core.errors import FscsError
from fscs.predict.inputs import parse_support

ROOT = Path(__file__).resolve().parent.parent
INPUT = 64


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    import torch

    from fscs.features.backbone import create_backbone
    from fscs.learn.model.cst import CST, config_from_store, save_checkpoint

    d = tmp_path_factory.mktemp("ckpt")
    bb = create_backbone("vit_tiny_random", INPUT)
    torch.manual_seed(0)
    model = CST(config_from_store(SimpleNamespace(attrs=bb.store_attrs("all"))))
    path = d / "fold0.pt"
    extra = {"label_size": 32, "supervision": "pixel", "pseudo": {"recipe": "cst", "cst_threshold": 0.45}}
    save_checkpoint(path, model, config_extra=extra, fold=0, supervision="pixel", epoch=0, val_miou=0.0)
    bad = torch.load(path, weights_only=True)
    bad["config"]["backbone"]["weights_sha256"] = "0" * 64
    torch.save(bad, d / "other.pt")
    return path, d / "other.pt"


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    paths = {}
    for name, (h, w) in {"a": (40, 50), "b": (64, 48), "q1": (30, 70), "q2": (64, 64)}.items():
        p = tmp_path / f"{name}.jpg"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths[name] = p
    m = np.zeros((40, 50), np.uint8)
    m[10:30, 5:25] = 1
    Image.fromarray(m, mode="L").save(tmp_path / "a_mask.png")
    paths["a_mask"] = tmp_path / "a_mask.png"
    Image.fromarray(np.zeros((41, 50), np.uint8), mode="L").save(tmp_path / "bad_mask.png")
    paths["bad_mask"] = tmp_path / "bad_mask.png"
    (tmp_path / "broken.jpg").write_text("not an image")
    paths["broken"] = tmp_path / "broken.jpg"
    return paths


def _args(ckpt, supports, queries, out, params=None):
    a = ["predict", "--checkpoint", str(ckpt), "--out", str(out)]
    for s in supports:
        a += ["--support", s]
    for q in queries:
        a += ["--query", str(q)]
    if params:
        a += ["--params", str(params)]
    return a


def test_parse_support():
    assert parse_support("x.jpg:cow") == parse_support("x.jpg:cow")
    s = parse_support("x.jpg:cow:m.png")
    assert (s.image, s.cls, s.mask) == ("x.jpg", "cow", "m.png")
    for bad in ("x.jpg", "x.jpg:", ":cow", "a:b:c:d", "x.jpg:cow:"):
        with pytest.raises(FscsError, match="IMG:CLASS"):
            parse_support(bad)


def test_end_to_end_tiny(tiny_ckpt, images, tmp_path, capsys):
    ckpt, _ = tiny_ckpt
    out = tmp_path / "pred"
    supports = [f"{images['a']}:cow:{images['a_mask']}", f"{images['b']}:cow", f"{images['b']}:sheep"]
    cli_main(_args(ckpt, supports, [images["q1"], images["q2"]], out))
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["classes"] == {"1": "cow", "2": "sheep"}
    assert [s["mask"] for s in summary["supports"]] == [str(images["a_mask"]), "pseudo", "pseudo"]
    # each support's overlay shows the mask its class was taught with: the given mask, coloured in place
    first = summary["supports"][0]
    with Image.open(out / first["overlay"]) as o, Image.open(images["a"]) as a:
        shown, raw = np.asarray(o), np.asarray(a.convert("RGB"))
    with Image.open(images["a_mask"]) as m:
        given = np.asarray(m) > 0
    assert shown.shape == raw.shape
    changed = np.any(shown != raw, axis=-1)
    assert changed[given].mean() > 0.9 and changed[~given].mean() < 0.1
    assert all((out / s["overlay"]).is_file() for s in summary["supports"])
    for name, (h, w) in (("q1", (30, 70)), ("q2", (64, 64))):
        doc = json.loads((out / f"{name}.json").read_text())
        assert [c["name"] for c in doc["classes"]] == ["cow", "sheep"]
        assert [c["shots"] for c in doc["classes"]] == [2, 1]
        for c in doc["classes"]:
            assert 0.0 <= c["probability"] <= 1.0 and c["present"] == (c["probability"] > 0.5)
        with Image.open(out / f"{name}_mask.png") as m:
            assert m.mode == "P" and m.size == (w, h)
            arr = np.asarray(m)
        assert set(np.unique(arr)) <= {0, 1, 2}
        assert sum(c["pixels"] for c in doc["classes"]) == int((arr > 0).sum())
        with Image.open(out / f"{name}_overlay.png") as o:
            assert o.size == (w, h) and o.mode == "RGB"
    assert "predict: 2 queries, 2 classes" in capsys.readouterr().out
    # deterministic
    out2 = tmp_path / "pred2"
    cli_main(_args(ckpt, supports, [images["q1"], images["q2"]], out2))
    assert (out / "q1.json").read_text() == (out2 / "q1.json").read_text()
    assert (out / "q1_mask.png").read_bytes() == (out2 / "q1_mask.png").read_bytes()


def test_stuff_supports_without_a_mask_use_the_complement(tiny_ckpt, images, tmp_path):
    ckpt, _ = tiny_ckpt
    supports = [f"{images['b']}:grass", f"{images['b']}:sheep"]
    plain, stuff = tmp_path / "plain", tmp_path / "stuff"
    cli_main(_args(ckpt, supports, [images["q1"]], plain))
    cli_main(_args(ckpt, supports, [images["q1"]], stuff) + ["--stuff", "grass"])
    doc = json.loads((stuff / "predictions.json").read_text())
    assert [s["mask"] for s in doc["supports"]] == ["pseudo, complemented (stuff)", "pseudo"]
    with Image.open(images["b"]) as b:
        raw = np.asarray(b.convert("RGB"))

    def taught(folder: Path, i: int) -> np.ndarray:
        name = json.loads((folder / "predictions.json").read_text())["supports"][i]["overlay"]
        with Image.open(folder / name) as o:
            return np.any(np.asarray(o) != raw, axis=-1)

    # the grass support is taught with the other pixels; the sheep support is unchanged
    a, c = taught(plain, 0), taught(stuff, 0)
    assert 0.05 < a.mean() < 0.95 and (a ^ c).mean() > 0.9
    np.testing.assert_array_equal(taught(plain, 1), taught(stuff, 1))
    # the params' stuff list applies only under its complement rule
    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump({"pseudo": {"stuff_masks": "complement", "stuff_classes": ["grass"]}}))
    via_params = tmp_path / "via_params"
    cli_main(_args(ckpt, supports, [images["q1"]], via_params, params))
    np.testing.assert_array_equal(taught(via_params, 0), c)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_ckpt", "checkpoint not found"),
        ("other_backbone", "weights_sha256"),
        ("params_backbone", "the params ask for"),
        ("broken_query", "does not decode"),
        ("missing_support", "image file not found"),
        ("bad_spec", "IMG:CLASS"),
        ("mask_size", "mask is 50x41 but its image is 50x40"),
    ],
)
def test_errors_before_output(tiny_ckpt, images, tmp_path, capsys, case, message):
    ckpt, other = tiny_ckpt
    out = tmp_path / "pred"
    supports, queries, params = [f"{images['a']}:cow"], [images["q1"]], None
    if case == "missing_ckpt":
        ckpt = tmp_path / "nope.pt"
    elif case == "other_backbone":
        ckpt = other
    elif case == "params_backbone":
        params = tmp_path / "params.yaml"
        params.write_text(yaml.safe_dump({"backbone": {"name": "dinov2_vits14_imgfocus", "input_size": 224}}))
    elif case == "broken_query":
        queries = [images["broken"]]
    elif case == "missing_support":
        supports = [f"{tmp_path / 'none.jpg'}:cow"]
    elif case == "bad_spec":
        supports = [f"{images['a']}"]
    elif case == "mask_size":
        supports = [f"{images['a']}:cow:{images['bad_mask']}"]
    with pytest.raises(SystemExit) as exc:
        cli_main(_args(ckpt, supports, queries, out, params))
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


MSRC = (ROOT.parent / "shared" / "data" / "msrc-v2").resolve()
CKPT = ROOT / "models" / "cst" / "pixel" / "fold0.pt"


@pytest.mark.slow
@pytest.mark.skipif(not (CKPT.is_file() and MSRC.is_dir()), reason="needs a trained checkpoint and MSRC")
def test_real_checkpoint_on_msrc_matches_the_evaluation_path(tmp_path):
    """`fscs predict` on MSRC photos (backbone run on the images) gives the evaluation path's answers
    (stored float16 tokens, GT support masks): same presence decisions, nearly the same pixels."""
    from fscs.config.params import load_config
    from fscs.data.images import load_mask
    from fscs.data.index import read_index
    from fscs.evaluation.episodes import decide
    from fscs.features.store import FeatureStore
    from fscs.learn.model.cst import load_checkpoint
    from fscs.learn.predictor import CSTPredictor, TokenBank
    from fscs.learn.targets import targets_for

    index_path = ROOT / "data" / "index" / "msrc.parquet"
    folds_path = ROOT / "data" / "episodes" / "msrc" / "folds.json"
    features = ROOT / "data" / "features" / "msrc.h5"
    if not (index_path.is_file() and folds_path.is_file() and features.is_file()):
        pytest.skip("needs the default pipeline's index, folds and feature store")
    folds = json.loads(folds_path.read_text())
    index = read_index(index_path)
    val = index[index["split"] == folds["test_split"]]
    cls = int(folds["folds"]["0"]["test"][0])
    with_cls = [i for i, cs in zip(val.index, val["classes"], strict=True) if cls in cs]
    sup, queries = with_cls[:2], with_cls[2:6]
    supports = []
    for s in sup:
        m = (load_mask(index.loc[s, "mask_path"]) == cls).astype(np.uint8)
        mp = tmp_path / f"{s}_mask.png"
        Image.fromarray(m, mode="L").save(mp)
        supports.append(f"{index.loc[s, 'image_path']}:{folds['classes'][str(cls)]}:{mp}")
    out = tmp_path / "pred"
    cli_main(_args(CKPT, supports, [index.loc[q, "image_path"] for q in queries], out))

    with FeatureStore(features) as store:
        model, ckpt = load_checkpoint(CKPT, store=store)
        size = int(ckpt["config"]["label_size"])
        targets = targets_for("pixel", load_config(ROOT / "params.yaml").pseudo, store, index, size, fold=0)
        reference = CSTPredictor(model, TokenBank(store), targets.test_support_mask)
        for q in queries:
            doc = json.loads((out / f"{q}.json").read_text())
            presence, fg = reference.predict(q, [cls], [sup])
            hw = (int(index.loc[q, "height"]), int(index.loc[q, "width"]))
            _, labels = decide(presence, fg, hw)
            assert doc["classes"][0]["probability"] == pytest.approx(float(presence[0]), abs=0.03)
            with Image.open(out / doc["mask"]) as m:
                agree = (np.asarray(m) == labels).mean()
            assert agree > 0.97, (q, agree)


@pytest.mark.slow
@pytest.mark.skipif(not MSRC.is_dir(), reason="needs ../shared/data/msrc-v2")
def test_real_backbone_on_msrc_images(tmp_path):
    """`fscs predict` end to end with the offline DINOv2 backbone on real MSRC photos of different sizes
    (an untrained CST: this checks the path — encoding, pseudo support masks, files — not accuracy)."""
    import torch

    from fscs.features.backbone import create_backbone
    from fscs.learn.model.cst import CST, config_from_store, save_checkpoint

    bb = create_backbone("dinov2_vits14_imgfocus", 224)
    torch.manual_seed(0)
    model = CST(config_from_store(SimpleNamespace(attrs=bb.store_attrs("all")), support_size=6))
    ckpt = tmp_path / "fold0.pt"
    extra = {"label_size": 64, "supervision": "image", "pseudo": {"recipe": "cst", "cst_threshold": 0.5}}
    save_checkpoint(ckpt, model, config_extra=extra, fold=0, supervision="image", epoch=0, val_miou=0.0)
    jpg = MSRC / "JPEGImages"
    supports = [f"{jpg / '1_1_s.jpg'}:grass", f"{jpg / '1_2_s.jpg'}:grass", f"{jpg / '2_1_s.jpg'}:tree"]
    queries = [jpg / "1_3_s.jpg", jpg / "3_1_s.jpg"]
    out = tmp_path / "pred"
    cli_main(_args(ckpt, supports, queries, out))
    for q in queries:
        doc = json.loads((out / f"{q.stem}.json").read_text())
        assert [c["name"] for c in doc["classes"]] == ["grass", "tree"]
        assert [c["shots"] for c in doc["classes"]] == [2, 1]
        with Image.open(q) as img, Image.open(out / f"{q.stem}_mask.png") as m:
            assert m.size == img.size
            assert set(np.unique(np.asarray(m))) <= {0, 1, 2}


def test_reference_z_standardises_each_class_by_its_references():
    from fscs.predict.reference import SPREAD_FLOOR, reference_z

    refs = np.array([[0.0, 10.0], [2.0, 10.0], [4.0, 10.0]])  # class 2: identical references
    z = reference_z(np.array([4.0, 11.0]), refs)
    assert z[0] == pytest.approx(2.0 / (np.std([0.0, 2.0, 4.0]) + SPREAD_FLOOR))
    assert z[1] == pytest.approx(1.0 / SPREAD_FLOOR)  # finite: the floor keeps it so
    with pytest.raises(ValueError, match="at least 2"):
        reference_z(np.array([1.0]), np.array([[0.0]]))


def test_reference_images_decide_presence_relative_to_their_scores(tiny_ckpt, images, tmp_path):
    """With --reference, a query's probability is the sigmoid of its log-odds standardised by the reference
    images' log-odds against the same supports (scored here as queries of a run without references)."""
    from fscs.learn.calibration import log_odds
    from fscs.predict.reference import reference_z

    ckpt, _ = tiny_ckpt
    supports = [f"{images['a']}:cow:{images['a_mask']}", f"{images['b']}:sheep"]
    refs = [images["a"], images["b"], images["q2"]]
    absolute, relative = tmp_path / "abs", tmp_path / "rel"
    cli_main(_args(ckpt, supports, [images["q1"], *refs], absolute))
    cli_main(
        _args(ckpt, supports, [images["q1"]], relative) + [a for r in refs for a in ("--reference", str(r))]
    )

    def probs(folder: Path, stem: str) -> np.ndarray:
        doc = json.loads((folder / f"{stem}.json").read_text())
        return np.array([c["probability"] for c in doc["classes"]])

    ref_odds = np.stack([log_odds(probs(absolute, stem)) for stem in ("a", "b", "q2")])
    want = 1 / (1 + np.exp(-reference_z(log_odds(probs(absolute, "q1")), ref_odds)))
    got = probs(relative, "q1")
    np.testing.assert_allclose(got, want, atol=2e-3)  # the JSON rounds probabilities to 6 digits
    doc = json.loads((relative / "predictions.json").read_text())
    assert doc["presence"] == "relative to 3 reference images"
    assert doc["references"] == [str(r) for r in refs]
    assert json.loads((absolute / "predictions.json").read_text())["presence"] == "the checkpoint's threshold"


def test_one_reference_image_is_refused_before_output(tiny_ckpt, images, tmp_path, capsys):
    ckpt, _ = tiny_ckpt
    out = tmp_path / "pred"
    with pytest.raises(SystemExit) as exc:
        cli_main(_args(ckpt, [f"{images['a']}:cow"], [images["q1"]], out) + ["--reference", str(images["b"])])
    assert exc.value.code == 2
    assert "1 reference image(s): relative presence needs at least 2" in capsys.readouterr().err
    assert not out.exists()
