"""The CJK glyph dataset builder on a few characters and two fonts (Debian font packages, see .ci/run)."""
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lib.data import glyphs
from lib.data.glyphs import FONTS, GlyphRecipe, build_glyph_split, materialize
from lib.data.splits import DATASETS, _INFO, load_split, register_dataset

TWO = ("uming", "notosans")
FACES = [f for f in FONTS if f.id in TWO]
needs_fonts = pytest.mark.skipif(bool(glyphs.missing_fonts(FACES)),
                                reason="fonts-arphic-uming and fonts-noto-cjk are not installed (.ci/run installs them)")
RECIPE = GlyphRecipe(num_train=6, num_test=3, min_fonts=2, fonts=TWO)


def _digest(root, split):
    return {p: hashlib.sha256(open(os.path.join(root, p), "rb").read()).hexdigest()
            for key in ("train", "val", "test") for cls in split[key] for p in cls}


@needs_fonts
def test_builder_makes_a_class_disjoint_recorded_split(tmp_path):
    split = build_glyph_split(tmp_path / "a", 0.5, RECIPE)
    assert [len(split[k]) for k in ("train", "val", "test")] == [3, 3, 3]
    chars = split["characters"]
    assert len(chars) == 9 and len(set(chars)) == 9
    assert all(0x4E00 <= ord(c) <= 0x9FFF for c in chars)
    classes = split["train"] + split["val"] + split["test"]
    for char, cls in zip(chars, classes):
        assert [p.split("/")[0] for p in cls] == [f"{ord(char):04X}"] * 2   # one class folder per character
        assert [p.split("/")[1] for p in cls] == ["uming.png", "notosans.png"]
    image = Image.open(tmp_path / "a" / classes[0][0])
    assert image.size == (128, 128) and image.mode == "L"
    pixels = np.asarray(image)
    assert pixels[0, 0] == 255 and pixels.min() < 64  # white paper, dark ink
    assert (pixels < 128).mean() > 0.02
    # the two fonts draw the same character differently, and different characters differ
    a, b = (np.asarray(Image.open(tmp_path / "a" / p), dtype=float) for p in classes[0])
    assert np.abs(a - b).mean() > 5
    fonts = {f["id"]: f for f in split["fonts"]}
    assert set(fonts) == set(TWO)
    for record in fonts.values():
        assert record["version"] and len(record["sha256"]) == 64 and os.path.isfile(record["path"])
    assert split["renderer"]["pillow"] and split["recipe"]["size"] == 128


@needs_fonts
def test_rebuild_is_identical_and_missing_images_are_rendered_again(tmp_path):
    first = build_glyph_split(tmp_path / "a", 0.5, RECIPE)
    second = build_glyph_split(tmp_path / "b", 0.5, RECIPE)
    assert first["characters"] == second["characters"]
    assert _digest(tmp_path / "a", first) == _digest(tmp_path / "b", second)
    gone = first["test"][1][0]
    before = _digest(tmp_path / "a", first)[gone]
    os.unlink(tmp_path / "a" / gone)
    materialize(first, tmp_path / "a")
    assert _digest(tmp_path / "a", first)[gone] == before


@needs_fonts
def test_registered_glyph_dataset_caches_its_split_and_renders_a_fresh_root(tmp_path):
    name = "glyphs-test-tiny"

    @register_dataset(name, folders=(str(tmp_path / "data"),), prepare=lambda split, root: materialize(split, root))
    def tiny(root, val_ratio):
        return build_glyph_split(root, val_ratio, RECIPE)

    try:
        built = load_split(name, str(tmp_path), splits_dir=tmp_path / "splits")
        assert (tmp_path / "splits" / f"{name}.json").is_file()
        # a fresh clone: the committed JSON without the rendered images
        for cls in built.split["test"]:
            for p in cls:
                os.unlink(tmp_path / "data" / p)
        again = load_split(name, str(tmp_path), splits_dir=tmp_path / "splits")
        assert again.split["characters"] == built.split["characters"]
        assert all(os.path.isfile(p) for p in again.subset("test")[0])
    finally:
        DATASETS.pop(name, None)
        _INFO.pop(name, None)


@needs_fonts
def test_a_missing_font_names_the_package(tmp_path, monkeypatch):
    missing = glyphs.FontFace("nofont", "fonts-not-there", str(tmp_path / "none.ttf"))
    with pytest.raises(FileNotFoundError, match="apt-get install fonts-not-there"):
        build_glyph_split(tmp_path, 0.5, GlyphRecipe(2, 2, 1, fonts=("nofont",)), faces=[missing])
    with pytest.raises(ValueError, match="unknown font id"):
        build_glyph_split(tmp_path, 0.5, GlyphRecipe(2, 2, 1, fonts=("nope",)))


def test_ci_installs_every_font_package():
    """.ci/run installs the Debian packages that the glyph dataset is drawn with (a fresh CI machine)."""
    script = open(os.path.join(os.path.dirname(__file__), "..", ".ci", "run")).read()
    listed = set(script.split('DEBIAN_PACKAGES="', 1)[1].split('"', 1)[0].split())
    assert set(glyphs.PACKAGES) <= listed, sorted(set(glyphs.PACKAGES) - listed)


# --- the embedded default: cjk-glyphs-mini --------------------------------------------------------

def test_committed_glyph_mini_loads_without_fonts_and_is_a_slice_of_cjk_glyphs(tmp_path, monkeypatch):
    from lib.data.splits import REPO_ROOT, load_split_json

    monkeypatch.chdir(tmp_path)  # found through the repository, whatever the working directory
    monkeypatch.setattr(glyphs, "GlyphRenderer", None)  # nothing may be rendered: every image is committed
    ds = load_split("cjk-glyphs-mini")
    assert Path(ds.root).resolve() == (REPO_ROOT / "data" / "cjk-glyphs-mini").resolve()
    summary = ds.summary()
    assert [summary[k]["classes"] for k in ("train", "val", "test")] == [60, 60, 80]
    sizes = [len(c) for k in ("train", "val", "test") for c in ds.split[k]]
    assert min(sizes) >= 6
    full = load_split_json(REPO_ROOT / "splits" / "cjk-glyphs.json")
    chars = ds.split["characters"]
    assert chars[:120] == full["characters"][:120] and chars[120:] == full["characters"][500:580]
    image = Image.open(ds.subset("test")[0][0])
    assert image.size == (128, 128)
    size = sum(p.stat().st_size for p in (REPO_ROOT / "data" / "cjk-glyphs-mini").rglob("*") if p.is_file())
    assert size < 12e6


@needs_fonts
def test_glyph_mini_rebuilds_identically_from_the_record(tmp_path):
    from lib.data.splits import REPO_ROOT, load_split_json

    committed = load_split_json(REPO_ROOT / "splits" / "cjk-glyphs-mini.json")
    sample = [cls[:1] for cls in committed["test"][:3]]  # one drawing of three characters, fonts as recorded
    split = {**committed, "train": [], "val": [], "test": sample}
    if glyphs.missing_fonts([f for f in FONTS if f.id in {p.split("/")[1][:-4] for c in sample for p in c}]):
        pytest.skip("a font of the sample is not installed")
    materialize(split, tmp_path)
    for cls in sample:
        for rel in cls:
            assert np.array_equal(np.asarray(Image.open(tmp_path / rel)),
                                  np.asarray(Image.open(REPO_ROOT / "data" / "cjk-glyphs-mini" / rel))), rel
