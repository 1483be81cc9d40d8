#!/usr/bin/env python
"""Build the embedded default dataset ``fashion-mnist-mini`` from the Fashion-MNIST IDX files.

Writes ``data/fashion-mnist-mini/<class>_<name>/<t10k index:04d>.png`` (the first ``--per-class`` = 200
t10k images of every class, in file order, 28x28 grayscale PNG, ``optimize=True``),
``data/fashion-mnist-mini/README.md`` (credit and licence) and ``splits/fashion-mnist-mini.json``, made
by the registered builder ``fashion-mnist-mini`` itself: classes 0-4 train (validation carved at
``val_ratio`` 0.5 by the reference rule, first ``int(5 * 0.5) = 2`` classes train, the other 3
validate), 5-9 test. Deterministic: the same input files give the same images and the same JSON.

    python tools/make_embedded_data.py                # from /usr/share/datasets/fashion-mnist
    python tools/make_embedded_data.py --source DIR   # another folder holding the four IDX files

``--glyphs`` builds the embedded default ``cjk-glyphs-mini`` instead: ``data/cjk-glyphs-mini/<code point>/
<font>.png`` and ``splits/cjk-glyphs-mini.json``, by the registered builder (``lib/data/splits.py``) from
the record in ``splits/cjk-glyphs.json``; it needs the font packages that ``.ci/run`` installs.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lib.data.splits import (  # noqa: E402
    FASHION_MNIST_CLASSES, FASHION_MNIST_SYSTEM_DIRS, MINI_NAME, SPLIT_FORMAT, build_fashion_mnist_mini,
    find_fashion_mnist, mini_class_folder, read_idx, save_split_json, validate_split, write_png,
)

README = """\
# fashion-mnist-mini

The default dataset of this toolkit, small enough to live in the repository: the first {per_class}
images of each of the 10 classes of the Fashion-MNIST test set (`t10k`, in file order), {total} images
in all, one 28x28 grayscale PNG each. The file `<class index>_<class name>/<index>.png` is image
`<index>` (0-based) of `t10k-images-idx3-ubyte`.

Split (`splits/fashion-mnist-mini.json`), class-disjoint like every retrieval benchmark:
classes 0-4 ({train}) train, with the validation classes carved by `val_ratio` 0.5 (the reference's
rule: the first `int(5 * 0.5) = 2` classes train, the other 3 validate); classes 5-9 ({test}) test.

Regenerate with `python tools/make_embedded_data.py` (reads Debian's `dataset-fashion-mnist` files in
`/usr/share/datasets/fashion-mnist/`).

## Credit and licence

Fashion-MNIST, Copyright (c) 2017 Zalando SE, https://tech.zalando.com, released under the MIT licence
(https://github.com/zalandoresearch/fashion-mnist). H. Xiao, K. Rasul, R. Vollgraf, "Fashion-MNIST: a
Novel Image Dataset for Benchmarking Machine Learning Algorithms", arXiv:1708.07747, 2017.

The MIT License (MIT)

Copyright (c) 2017 Zalando SE

Permission is hereby granted, free of charge, to any person obtaining a copy of this software and
associated documentation files (the "Software"), to deal in the Software without restriction, including
without limitation the rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is furnished to do so, subject to the
following conditions:

The above copyright notice and this permission notice shall be included in all copies or substantial
portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT
LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO
EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER
IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR
THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""


def build(source_dirs, out_dir: Path, split_path: Path, per_class: int = 200, val_ratio: float = 0.5) -> dict:
    files = find_fashion_mnist(source_dirs)
    images, labels = read_idx(files["t10k-images"]), read_idx(files["t10k-labels"])
    for c in range(10):
        picked = np.flatnonzero(labels == c)[:per_class]
        if len(picked) < per_class:
            raise ValueError(f"class {c} has only {len(picked)} t10k images, fewer than {per_class}")
        for i in picked:
            write_png(images[i], out_dir / mini_class_folder(c) / f"{int(i):04d}.png", optimize=True)
    split = build_fashion_mnist_mini(str(out_dir), val_ratio)
    # the same dict load_split caches, so a rebuild at val_ratio 0.5 rewrites the file byte for byte
    split = {"name": MINI_NAME, "format": SPLIT_FORMAT, **split}
    validate_split(split, out_dir, name=str(split_path))
    save_split_json(split, split_path)
    (out_dir / "README.md").write_text(README.format(
        per_class=per_class, total=10 * per_class, train=", ".join(FASHION_MNIST_CLASSES[:5]),
        test=", ".join(FASHION_MNIST_CLASSES[5:])))
    return split


GLYPHS_README = """\
# cjk-glyphs-mini

The default dataset of this toolkit, small enough to live in the repository: {train} training characters
({val} of them validate at `val_ratio` 0.5) and {test} test characters of `cjk-glyphs`, every drawing that
dataset has of them ({images} images, 14-21 per character), rendered at {size} px by
`python tools/make_embedded_data.py --glyphs` from the record in `splits/cjk-glyphs.json`.
A class is a character (folder: its code point), an image one font's drawing of it (file: the font).

## Credit and licences

The images are renderings of characters by these fonts from Debian's packages, each under its own
licence (`/usr/share/doc/<package>/copyright` on a Debian system): {fonts}.
"""


def build_glyphs(out_dir: Path, split_path: Path) -> dict:
    from lib.data.splits import GLYPHS_MINI, load_split

    if out_dir != ROOT / "data" / GLYPHS_MINI or split_path != ROOT / "splits" / f"{GLYPHS_MINI}.json":
        raise ValueError("--glyphs writes data/cjk-glyphs-mini and splits/cjk-glyphs-mini.json of this repository")
    if out_dir.is_dir():
        shutil.rmtree(out_dir)
    split_path.unlink(missing_ok=True)
    split = load_split(GLYPHS_MINI, str(ROOT / "data")).split
    fonts = sorted({f"{f['id']} ({f['package']} {f['version']})" for f in split["fonts"]})
    (out_dir / "README.md").write_text(GLYPHS_README.format(
        train=len(split["train"]) + len(split["val"]), val=len(split["val"]), test=len(split["test"]),
        images=sum(len(c) for k in ("train", "val", "test") for c in split[k]), size=split["recipe"]["size"],
        fonts=", ".join(fonts)))
    return split


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--glyphs", action="store_true", help="build cjk-glyphs-mini (the default) instead")
    parser.add_argument("--source", action="append", help="folder with the IDX files (repeatable); default: "
                        + ", ".join(FASHION_MNIST_SYSTEM_DIRS))
    parser.add_argument("--out", default=str(ROOT / "data" / MINI_NAME))
    parser.add_argument("--split", default=str(ROOT / "splits" / f"{MINI_NAME}.json"))
    parser.add_argument("--per-class", type=int, default=200)
    args = parser.parse_args(argv)
    if args.glyphs:
        from lib.data.splits import GLYPHS_MINI

        out = ROOT / "data" / GLYPHS_MINI
        split = build_glyphs(out, ROOT / "splits" / f"{GLYPHS_MINI}.json")
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        print(f"wrote {sum(len(c) for k in ('train', 'val', 'test') for c in split[k])} images to {out} ({size / 1e6:.2f} MB)")
        return
    out = Path(args.out)
    for stale in [out / "images", *(out / mini_class_folder(c) for c in range(10))]:
        if stale.is_dir():
            shutil.rmtree(stale)  # stale files from a larger --per-class (or the old layout) would stay otherwise
    split = build(args.source or FASHION_MNIST_SYSTEM_DIRS, out, Path(args.split), per_class=args.per_class)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {sum(len(c) for k in ('train', 'val', 'test') for c in split[k])} images to {out} "
          f"({size / 1e6:.2f} MB) and {args.split}")


if __name__ == "__main__":
    main()
