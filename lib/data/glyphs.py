"""CJK glyphs: a many-class, zero-shot retrieval dataset that builds offline from Debian's font packages.

A class is a CJK ideograph (U+4E00..U+9FFF), an image is one font's drawing of it: Kai, Ming/Sung,
Hei, Gothic, Mincho, Noto Sans and Serif at two weights, rounded faces, brush and handwriting styles.
The same character drawn by a brush font and by a geometric sans shares its structure (strokes and
their arrangement), not its pixels, so retrieval has to learn shape, not appearance; and at 32 px the
strokes of a complex character merge, so the resolution gap matters as it does for fine-grained photos.

What the official benchmarks have, this has: hundreds of training classes and a class-disjoint test set
of hundreds more (CUB: 100 + 100, SOP: 11,318 + 11,316), several images per class that differ in style
(here 12 to 21), and no overlap between the fonts' roles (every font draws train and test classes, as
every camera shoots train and test birds).

Reproducible: the characters are chosen by a fixed rule from the fonts' own character maps (a glyph
counts only where the font maps the code point to a glyph of its own, not a shared fallback, and the
rendering has ink), in a seeded order; the split JSON records the characters, every font's Debian package
and version, file, face and SHA-256, and the Pillow and FreeType versions. A cached split whose images are
missing (a fresh clone) is re-rendered from that record, and a font that changed is reported by name.

Rendering: white background, black glyph drawn at 4x and reduced with a Lanczos filter to
``GLYPH_SIZE`` (128) px, grayscale PNG; the ink's bounding box is centred and the font's own scale kept
(font size 0.75 of the image), shrunk only where the glyph would not fit in 124 px.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

GLYPH_SIZE = 128
SUPERSAMPLE = 4
FONT_SCALE = 0.75   # font size / image size
MAX_INK = 124       # largest ink extent, px at GLYPH_SIZE
CJK_RANGE = (0x4E00, 0x9FFF)
MIN_INK_PIXELS = 20  # at GLYPH_SIZE: below this a drawing counts as empty
SELECTION_SEED = 20230103  # seeds the character order; part of the recorded recipe


@dataclass(frozen=True)
class FontFace:
    """One drawing style: a face of a font file shipped by a Debian package."""

    id: str          # file name of its images: <class>/<id>.png
    package: str     # Debian package
    path: str        # font file
    index: int = 0   # face within a .ttc collection
    style: str = ""  # for people


FONT_DIR = "/usr/share/fonts"
#: the drawing styles, one face per design (regional variants and near-copies of one design left out)
FONTS: tuple = (
    FontFace("ukai", "fonts-arphic-ukai", f"{FONT_DIR}/truetype/arphic/ukai.ttc", 0, "Kai (brush-script book hand)"),
    FontFace("uming", "fonts-arphic-uming", f"{FONT_DIR}/truetype/arphic/uming.ttc", 0, "Ming (Song, print)"),
    FontFace("zenhei", "fonts-wqy-zenhei", f"{FONT_DIR}/truetype/wqy/wqy-zenhei.ttc", 0, "Hei (sans)"),
    FontFace("microhei", "fonts-wqy-microhei", f"{FONT_DIR}/truetype/wqy/wqy-microhei.ttc", 0, "Hei (sans, Droid-derived)"),
    FontFace("ipagothic", "fonts-ipafont-gothic", f"{FONT_DIR}/opentype/ipafont-gothic/ipag.ttf", 0, "Gothic"),
    FontFace("ipamincho", "fonts-ipafont-mincho", f"{FONT_DIR}/opentype/ipafont-mincho/ipam.ttf", 0, "Mincho"),
    FontFace("notosans", "fonts-noto-cjk", f"{FONT_DIR}/opentype/noto/NotoSansCJK-Regular.ttc", 0, "Noto Sans JP"),
    FontFace("notosans-bold", "fonts-noto-cjk", f"{FONT_DIR}/opentype/noto/NotoSansCJK-Bold.ttc", 0, "Noto Sans JP Bold"),
    FontFace("notoserif", "fonts-noto-cjk", f"{FONT_DIR}/opentype/noto/NotoSerifCJK-Regular.ttc", 0, "Noto Serif JP"),
    FontFace("notoserif-bold", "fonts-noto-cjk", f"{FONT_DIR}/opentype/noto/NotoSerifCJK-Bold.ttc", 0, "Noto Serif JP Bold"),
    FontFace("kouzan", "fonts-aoyagi-kouzan-t", f"{FONT_DIR}/truetype/aoyagi-kouzan-t/AoyagiKouzanT.ttf", 0, "brush (gyosho)"),
    FontFace("soseki", "fonts-aoyagi-soseki", f"{FONT_DIR}/truetype/aoyagi-soseki/aoyagi-soseki.ttf", 0, "brush (handwritten)"),
    FontFace("seto", "fonts-seto", f"{FONT_DIR}/truetype/seto/setofont.ttf", 0, "pen handwriting"),
    FontFace("kiloji", "fonts-kiloji", f"{FONT_DIR}/truetype/kiloji/kiloji.ttf", 0, "longhand"),
    FontFace("vlgothic", "fonts-vlgothic", f"{FONT_DIR}/truetype/vlgothic/VL-Gothic-Regular.ttf", 0, "Gothic (M+/Sazanami)"),
    FontFace("maruberi", "fonts-motoya-l-maruberi", f"{FONT_DIR}/truetype/motoya-l-maruberi/MTLmr3m.ttf", 0, "rounded Gothic"),
    FontFace("cedar", "fonts-motoya-l-cedar", f"{FONT_DIR}/truetype/motoya-l-cedar/MTLc3m.ttf", 0, "Gothic (Motoya)"),
    FontFace("cwkai", "fonts-cwtex-kai", f"{FONT_DIR}/truetype/cwtex/cwkai.ttf", 0, "Kai (cwTeX)"),
    FontFace("cwfs", "fonts-cwtex-fs", f"{FONT_DIR}/truetype/cwtex/cwfs.ttf", 0, "FangSong"),
    FontFace("cwyen", "fonts-cwtex-yen", f"{FONT_DIR}/truetype/cwtex/cwyen.ttf", 0, "Yuan (rounded)"),
    FontFace("cwheib", "fonts-cwtex-heib", f"{FONT_DIR}/truetype/cwtex/cwheib.ttf", 0, "Hei Bold"),
)
PACKAGES = tuple(sorted({f.package for f in FONTS}))


def package_version(package: str) -> Optional[str]:
    """The installed Debian version of ``package`` (``dpkg-query``), or None."""
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", package], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def class_folder(char: str) -> str:
    """``'4E00'``: the code point in hex, a file-system-safe class folder."""
    return f"{ord(char):04X}"


def _render_versions() -> Dict[str, str]:
    import PIL
    from PIL import features

    return {"pillow": PIL.__version__, "freetype": str(features.version("freetype2"))}


class GlyphRenderer:
    """Draws characters of one :class:`FontFace` as ``size`` x ``size`` grayscale arrays (0 ink, 255 paper)."""

    def __init__(self, face: FontFace, size: int = GLYPH_SIZE):
        from PIL import ImageFont

        self.face, self.size = face, size
        self.big = size * SUPERSAMPLE
        self.font = ImageFont.truetype(face.path, size=int(round(self.big * FONT_SCALE)), index=face.index)

    def render(self, char: str) -> Optional[np.ndarray]:
        """The drawing of ``char``, or None when the font draws nothing (no ink)."""
        from PIL import Image, ImageDraw

        canvas = Image.new("L", (2 * self.big, 2 * self.big), 0)  # ink as 255 while measuring
        ImageDraw.Draw(canvas).text((self.big, self.big), char, font=self.font, fill=255, anchor="mm")
        box = canvas.getbbox()
        if box is None:
            return None
        ink = canvas.crop(box)
        extent = max(ink.size)
        limit = MAX_INK * SUPERSAMPLE
        if extent > limit:  # a glyph larger than the image: shrink it to fit, keep its proportions
            ink = ink.resize((max(1, round(ink.width * limit / extent)), max(1, round(ink.height * limit / extent))),
                             Image.Resampling.LANCZOS)
        page = Image.new("L", (self.big, self.big), 0)
        page.paste(ink, ((self.big - ink.width) // 2, (self.big - ink.height) // 2))
        small = np.asarray(page.resize((self.size, self.size), Image.Resampling.LANCZOS))
        if int((small > 127).sum()) < MIN_INK_PIXELS * (self.size / GLYPH_SIZE) ** 2:
            return None
        return 255 - small


def own_glyphs(face: FontFace) -> set:
    """Code points in :data:`CJK_RANGE` that ``face`` maps to a glyph of their own.

    Some fonts map code points they do not draw to one shared fallback glyph: any glyph that two or more
    code points of the range share is not counted, nor ``.notdef``.
    """
    from fontTools.ttLib import TTFont

    font = TTFont(face.path, fontNumber=face.index, lazy=True)
    try:
        cmap = font.getBestCmap() or {}
    finally:
        font.close()
    in_range = {cp: name for cp, name in cmap.items() if CJK_RANGE[0] <= cp <= CJK_RANGE[1]}
    uses: Dict[str, int] = {}
    for name in in_range.values():
        uses[name] = uses.get(name, 0) + 1
    return {cp for cp, name in in_range.items() if uses[name] == 1 and name != ".notdef"}


@dataclass(frozen=True)
class GlyphRecipe:
    """What decides the dataset: the fonts, how many classes, how many drawings a class needs."""

    num_train: int = 500
    num_test: int = 500
    min_fonts: int = 14
    size: int = GLYPH_SIZE
    seed: int = SELECTION_SEED
    fonts: Sequence[str] = tuple(f.id for f in FONTS)


def select_characters(coverage: Dict[str, set], recipe: GlyphRecipe,
                      renderers: Optional[Dict[str, "GlyphRenderer"]] = None) -> Dict[str, Dict[str, np.ndarray]]:
    """``num_train + num_test`` characters, each with the drawings that have ink.

    The code points that at least ``min_fonts`` faces map to a glyph of their own are sorted and put in a
    seeded random order; walking that order, a character is kept when at least ``min_fonts`` of its
    drawings have ink (some fonts map code points to empty glyphs), until enough are kept.
    Returns ``{char: {font id: drawing}}`` in the order kept.
    """
    counts: Dict[int, int] = {}
    for cps in coverage.values():
        for cp in cps:
            counts[cp] = counts.get(cp, 0) + 1
    eligible = sorted(cp for cp, n in counts.items() if n >= recipe.min_fonts)
    needed = recipe.num_train + recipe.num_test
    renderers = renderers or {}
    order = np.random.default_rng(recipe.seed).permutation(len(eligible))
    kept: Dict[str, Dict[str, np.ndarray]] = {}
    for i in order:
        char = chr(eligible[i])
        drawings = {}
        for font_id, cps in coverage.items():
            if eligible[i] in cps:
                drawing = renderers[font_id].render(char) if font_id in renderers else None
                if drawing is not None:
                    drawings[font_id] = drawing
        if len(drawings) >= recipe.min_fonts:
            kept[char] = drawings
            if len(kept) == needed:
                return kept
    raise ValueError(f"only {len(kept)} characters have >= {recipe.min_fonts} inked drawings among the fonts "
                     f"{sorted(coverage)}; {needed} are needed (lower min_fonts or the class counts)")


def missing_fonts(faces: Sequence[FontFace]) -> List[FontFace]:
    return [f for f in faces if not os.path.isfile(f.path)]


def _require_fonts(faces: Sequence[FontFace]) -> None:
    absent = missing_fonts(faces)
    if absent:
        packages = sorted({f.package for f in absent})
        raise FileNotFoundError(
            "CJK glyph dataset: font files not found: " + ", ".join(f"{f.path} ({f.package})" for f in absent)
            + f". Install them with: apt-get install {' '.join(packages)}")


def font_record(face: FontFace) -> dict:
    return {**asdict(face), "version": package_version(face.package), "sha256": file_sha256(face.path)}


def build_glyph_split(root: str | os.PathLike, val_ratio: float, recipe: GlyphRecipe = GlyphRecipe(),
                      faces: Sequence[FontFace] = FONTS, *, name: str = "cjk-glyphs") -> dict:
    """Render the dataset into ``root`` (existing files of the same recipe are kept) and return its split.

    The first ``num_train`` selected characters train (validation carved at ``val_ratio``), the other
    ``num_test`` test. A class lists the drawings that have ink, in the order of ``faces``.
    """
    from lib.data.splits import carve_val

    by_id = {f.id: f for f in faces}
    unknown = [i for i in recipe.fonts if i not in by_id]
    if unknown:
        raise ValueError(f"{name}: unknown font id(s) {unknown}; known: {sorted(by_id)}")
    chosen = [by_id[i] for i in recipe.fonts]
    _require_fonts(chosen)
    coverage = {f.id: own_glyphs(f) for f in chosen}
    renderers = {f.id: GlyphRenderer(f, recipe.size) for f in chosen}
    selected = select_characters(coverage, recipe, renderers)
    chars = list(selected)
    classes = write_drawings(root, selected, chosen)
    train, val = carve_val(classes[: recipe.num_train], val_ratio)
    return {
        "description": (f"CJK ideographs drawn by {len(chosen)} fonts from Debian packages at {recipe.size} px; "
                        f"a class is a character, an image one font's drawing; {recipe.num_train} training "
                        f"characters, {recipe.num_test} test characters (lib/data/glyphs.py)"),
        "train": train, "val": val, "test": classes[recipe.num_train:], "val_ratio": float(val_ratio),
        "characters": "".join(chars),
        "recipe": {**asdict(recipe), "fonts": list(recipe.fonts), "supersample": SUPERSAMPLE,
                   "font_scale": FONT_SCALE, "max_ink": MAX_INK, "cjk_range": [hex(c) for c in CJK_RANGE]},
        "fonts": [font_record(f) for f in chosen],
        "renderer": _render_versions(),
    }


def write_drawings(root: str | os.PathLike, drawings: Dict[str, Dict[str, np.ndarray]],
                   faces: Sequence[FontFace]) -> List[List[str]]:
    """Write ``<root>/<class>/<font id>.png`` (files already there are kept); the relative paths per
    character, in the order of ``faces``."""
    from lib.data.splits import write_png

    classes = []
    for char, by_font in drawings.items():
        images = []
        for face in faces:
            if face.id in by_font:
                rel = f"{class_folder(char)}/{face.id}.png"
                if not os.path.isfile(os.path.join(root, rel)):
                    write_png(by_font[face.id], os.path.join(root, rel), optimize=True)
                images.append(rel)
        classes.append(images)
    return classes


def materialize(split: dict, root: str | os.PathLike, name: str = "cjk-glyphs") -> None:
    """Render the images a cached split lists but ``root`` lacks, from the split's own record
    (characters, fonts, size); warn, naming the font, where an installed font differs from the record."""
    from lib.data.splits import DISJOINT_SUBSETS

    wanted: Dict[str, set] = {}
    for key in DISJOINT_SUBSETS:
        for cls in split.get(key, []) or []:
            for rel in cls:
                if not os.path.isfile(os.path.join(root, rel)):
                    folder, file = rel.split("/", 1)
                    wanted.setdefault(chr(int(folder, 16)), set()).add(file.rsplit(".", 1)[0])
    if not wanted:
        return
    records = {r["id"]: r for r in split.get("fonts", [])}
    faces = [FontFace(r["id"], r["package"], r["path"], int(r.get("index", 0)), r.get("style", ""))
             for r in split.get("fonts", [])]
    used = {i for ids in wanted.values() for i in ids}
    faces = [f for f in faces if f.id in used]
    unknown = used - {f.id for f in faces}
    if unknown:
        raise ValueError(f"{name}: the split lists images of font(s) {sorted(unknown)} that its 'fonts' record lacks")
    _require_fonts(faces)
    for face in faces:
        recorded = records[face.id].get("sha256")
        if recorded and file_sha256(face.path) != recorded:
            warnings.warn(f"{name}: font {face.id} ({face.path}, package {face.package} "
                          f"{package_version(face.package)}) differs from the one the split was made with "
                          f"(version {records[face.id].get('version')}); its drawings may differ", RuntimeWarning)
    size = int(split.get("recipe", {}).get("size", GLYPH_SIZE))
    renderers = {f.id: GlyphRenderer(f, size) for f in faces}
    drawings: Dict[str, Dict[str, np.ndarray]] = {}
    for char, ids in sorted(wanted.items()):
        drawings[char] = {}
        for font_id in sorted(ids):
            drawing = renderers[font_id].render(char)
            if drawing is None:
                raise ValueError(f"{name}: font {font_id} ({records[font_id]['path']}) draws nothing for "
                                 f"{char!r} (U+{ord(char):04X}), which the split records")
            drawings[char][font_id] = drawing
    write_drawings(root, drawings, faces)


def build_glyph_subset(root: str | os.PathLike, val_ratio: float, source: dict, *, num_train: int, num_test: int,
                       size: int, name: str) -> dict:
    """A smaller copy of a glyph split: its first ``num_train`` training characters (validation carved at
    ``val_ratio``) and first ``num_test`` test characters, every drawing the source lists, at ``size`` px.

    Rendered from the source's own record (characters, fonts), so it needs no selection pass; images
    already in ``root`` are kept (the committed embedded copy needs no font at all).
    """
    from lib.data.splits import carve_val

    chars, first_test = source["characters"], int(source["recipe"]["num_train"])
    classes = list(source["train"]) + list(source["val"] or []) + list(source["test"])
    if num_train > first_test or num_test > len(chars) - first_test:
        raise ValueError(f"{name}: the source has {first_test} training and {len(chars) - first_test} test characters; "
                         f"asked for {num_train} and {num_test}")
    picked = list(range(num_train)) + list(range(first_test, first_test + num_test))
    subset = [[rel for rel in classes[i]] for i in picked]
    train, val = carve_val(subset[:num_train], val_ratio)
    split = {
        "description": (f"{num_train} training and {num_test} test characters of {source.get('name', 'cjk-glyphs')}, "
                        f"all their drawings, at {size} px (lib/data/glyphs.py: build_glyph_subset)"),
        "train": train, "val": val, "test": subset[num_train:], "val_ratio": float(val_ratio),
        "characters": "".join(chars[i] for i in picked),
        "recipe": {**source["recipe"], "size": int(size), "num_train": num_train, "num_test": num_test},
        "source": source.get("name", "cjk-glyphs"),
        "fonts": source["fonts"],
        "renderer": _render_versions(),
    }
    materialize(split, root, name)
    return split


__all__ = ["FONTS", "FontFace", "GLYPH_SIZE", "GlyphRecipe", "GlyphRenderer", "PACKAGES", "build_glyph_split", "build_glyph_subset",
           "class_folder", "materialize", "own_glyphs", "select_characters", "write_drawings"]
