"""Class-disjoint dataset splits: the official ones, custom ones, and their validation.

A *split* is a plain dict, stored as JSON::

    {"train": [[paths of class 0], [paths of class 1], ...],
     "val":   [...],            # may be empty; the classes held out of training for model selection
     "test":  [...],
     "query": [...], "gallery": [...]}   # optional (In-Shop): same class order as "test"

Every subset is a list of classes and every class a list of image paths relative to the dataset's
root folder. Classes are disjoint across train / val / test: deep metric learning evaluates on
classes never seen in training (the zero-shot protocol of Suma & Tolias, WACV 2023, Sec. 4, which
follows Oh Song et al., CVPR 2016). Any other top-level key (``name``, ``root``, ``val_ratio``,
``format``, ``description``, ``classes``) is metadata.

:func:`load_split` turns a name into a :class:`DatasetSplit` in one of three ways:

1. a path to a ``.json`` split file; its paths are relative to ``data_root`` unless the file has a
   top-level ``"root"`` (a relative ``root`` is taken relative to the JSON file's folder);
2. ``folder:/some/dir`` (or the path of an existing directory) with one sub-folder of images per
   class: classes sorted by name, the first half (rounded up) train, the rest test;
3. a registered name (:data:`DATASETS`): the builder reads the official files under
   ``<data_root>/<folder>``; its split is cached as ``<splits_dir>/<name>.json`` (default: the
   repository's ``splits/``) with the ``val_ratio`` it was built with, so that later runs read the JSON
   only; a different ``val_ratio`` rebuilds it (delete the file to rebuild it anyway).

Validation classes are carved from the training classes as the reference code does (``val_ratio``
0.5 by default): the first ``int(n * (1 - val_ratio))`` classes train, the rest validate. The final
run trains on both (:func:`trainval`).
"""
from __future__ import annotations

import gzip
import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from lib.registry import Registry

REPO_ROOT = Path(__file__).resolve().parents[2]
SPLIT_FORMAT = 1
#: subsets whose classes are disjoint from each other and whose paths must not repeat across them
DISJOINT_SUBSETS = ("train", "val", "test")
#: per-class views of "test" (In-Shop's query/gallery protocol); a class may be empty in one of them
VIEW_SUBSETS = ("query", "gallery")
SUBSET_SUFFIXES = ("train", "val", "test", "query", "gallery")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
#: default folder of cached / committed split files: the repository's ``splits/``, whatever the cwd
SPLITS_DIR = REPO_ROOT / "splits"

Split = Dict[str, list]
Builder = Callable[[str, float], Split]

#: name -> ``builder(root, val_ratio) -> split dict`` (paths relative to ``root``)
DATASETS = Registry("dataset")


@dataclass(frozen=True)
class _DatasetInfo:
    folders: Tuple[str, ...]  # candidate dataset folders, relative to data_root or absolute
    cache: bool               # cache the built split as <splits_dir>/<name>.json
    prepare: Optional[Callable[[Split, str], None]] = None  # makes a cached split's missing files (rendered data)


_INFO: Dict[str, _DatasetInfo] = {}


def register_dataset(name: str, *, folders: Sequence[str] | None = None, cache: bool = True,
                     prepare: Optional[Callable[[Split, str], None]] = None) -> Callable:
    """Decorator registering ``builder(root, val_ratio) -> split dict`` under ``name``.

    ``root`` is the first of ``<data_root>/<folder>`` (``folders`` defaults to ``[name]``; an absolute
    folder is used as is) that exists, else the first candidate. The builder returns paths relative to
    ``root`` and may use :func:`carve_val` for the validation classes. With ``cache`` the split is written
    to ``<splits_dir>/<name>.json`` on first use and read from there afterwards. ``prepare(split, root)``,
    for datasets that are made rather than read (rendered glyphs), writes the files a cached split lists
    but ``root`` lacks, before the split is validated.

    >>> @register_dataset("my-shoes")
    ... def my_shoes(root, val_ratio):
    ...     classes = [[f"{c}/{i}.jpg" for i in range(4)] for c in range(10)]
    ...     train, val = carve_val(classes[:5], val_ratio)
    ...     return {"train": train, "val": val, "test": classes[5:]}
    """

    def wrap(builder: Builder) -> Builder:
        DATASETS.register(name)(builder)
        _INFO[name] = _DatasetInfo(tuple(folders or (name,)), cache, prepare)
        return builder

    return wrap


# ----------------------------------------------------------------------------------------------------
# pure helpers on split dicts
# ----------------------------------------------------------------------------------------------------

def carve_val(classes: list, val_ratio: float) -> Tuple[list, list]:
    """``(train, val)``: the first ``int(n * (1 - val_ratio))`` classes train, the rest validate.

    The reference's rule (RAML ``datahelpers.give_*_datasets``). A tiny epsilon guards the float product
    (``int(10 * (1 - 0.9))`` would otherwise give 0 instead of 1).
    """
    if not isinstance(val_ratio, (int, float)) or not 0.0 <= float(val_ratio) < 1.0:
        raise ValueError(f"val_ratio must be in [0, 1), got {val_ratio!r}")
    classes = list(classes)
    num_train = int(len(classes) * (1.0 - float(val_ratio)) + 1e-9)
    return classes[:num_train], classes[num_train:]


def trainval(split: Split) -> Split:
    """A copy of ``split`` with the validation classes appended to the training classes and val empty.

    The final run of the protocol trains on train + val (Suma & Tolias 2023, Sec. 4; ``--no-val``).
    """
    merged = dict(split)
    merged["train"] = list(split.get("train", [])) + list(split.get("val", []) or [])
    merged["val"] = []
    merged.pop("val_ratio", None)
    return merged


def recarve(split: Split, val_ratio: float) -> Split:
    """``split`` with train + val carved again at ``val_ratio`` (class order kept)."""
    classes = list(split.get("train", [])) + list(split.get("val", []) or [])
    train, val = carve_val(classes, val_ratio)
    out = dict(split)
    out.update(train=train, val=val, val_ratio=float(val_ratio))
    return out


def parse_dataset_spec(spec: str) -> Tuple[str, str]:
    """``'cub-test'`` -> ``('cub', 'test')``, ``'cub-val'`` -> ``('cub', 'val')``, ``'cub'`` -> ``('cub', 'train')``.

    The recognised suffixes are ``-train``, ``-val``, ``-test``, ``-query`` and ``-gallery``; they also
    apply to split files and folders (``splits/mine.json-test``, ``folder:/data/shoes-test``).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"empty dataset specification {spec!r}")
    spec = spec.strip()
    for subset in SUBSET_SUFFIXES:
        suffix = "-" + subset
        if spec.endswith(suffix) and len(spec) > len(suffix):
            return spec[: -len(suffix)], subset
    return spec, "train"


def _subsets(split: Split) -> List[str]:
    """Keys of ``split`` that hold subsets (train, val, test, query, gallery); other keys are metadata."""
    return [k for k in DISJOINT_SUBSETS + VIEW_SUBSETS if k in split]


def split_summary(split: Split) -> Dict[str, Dict[str, int]]:
    """Per subset: number of classes, of images, and of classes with a single image.

    In a test (or val) subset, a single-image class gives a query without any positive: its AP is
    undefined and its R@k is 0. Callers decide whether to warn.
    """
    out = {}
    for key in _subsets(split):
        classes = split[key]
        out[key] = {"classes": len(classes), "images": sum(len(c) for c in classes),
                    "singletons": sum(len(c) == 1 for c in classes)}
    return out


def validate_split(split: Split, root: str | os.PathLike | None = None, *, check_files: bool = True,
                   name: str = "split") -> None:
    """Raise ``ValueError`` (structure) or ``FileNotFoundError`` (missing image) naming the entry.

    Checks: a dict with ``train`` and ``test``; every subset a list of classes, every class a non-empty
    list of strings (classes of ``query``/``gallery`` may be empty); no relative path that leaves ``root``
    (``../x``; an absolute path is taken as it is); no file twice within a subset or across
    train/val/test, comparing paths after normalisation against ``root`` (``./a/x.png``, ``a//x.png`` and
    ``a/b/../x.png`` are ``a/x.png``; symbolic links are not followed); with ``check_files``, every image
    exists under ``root`` and its header reads as an image (:func:`unreadable_images`). A class with a
    single image is allowed (see :func:`split_summary`). ``name`` (the split file or dataset) starts each
    message.
    """
    if not isinstance(split, dict):
        raise ValueError(f"{name}: a split must be a JSON object / dict with 'train' and 'test', "
                         f"got {type(split).__name__}")
    for key in ("train", "test"):
        if key not in split:
            raise ValueError(f"{name}: missing the {key!r} subset (keys present: {sorted(split)})")
    for key in DISJOINT_SUBSETS + VIEW_SUBSETS:
        if key in split and not isinstance(split[key], list):
            raise ValueError(f"{name}: subset {key!r} must be a list of classes (lists of paths), "
                             f"got {type(split[key]).__name__}")
    base = os.path.abspath(root) if root is not None else ""
    seen: Dict[str, Tuple[str, int, str]] = {}
    missing: List[Tuple[str, int, str]] = []
    to_read: Dict[str, Tuple[str, int, str]] = {}
    num_images = 0
    for key in _subsets(split):
        view = key in VIEW_SUBSETS
        in_subset: Dict[str, Tuple[int, str]] = {}
        for c, cls in enumerate(split[key]):
            if not isinstance(cls, list):
                raise ValueError(f"{name}: subset {key!r} class {c} must be a list of image paths, "
                                 f"got {type(cls).__name__} ({str(cls)[:60]!r})")
            if not cls and not view:
                raise ValueError(f"{name}: subset {key!r} class {c} is empty")
            for path in cls:
                if not isinstance(path, str) or not path:
                    raise ValueError(f"{name}: subset {key!r} class {c}: image path must be a non-empty "
                                     f"string, got {path!r}")
                file = resolve_image_path(path, base, where=f"{name}: subset {key!r} class {c}")
                if file in in_subset:
                    oc, other_path = in_subset[file]
                    same = "" if other_path == path else f" (as {other_path!r} and {path!r})"
                    raise ValueError(f"{name}: subset {key!r} holds {path!r} twice{same} (classes {oc} and {c})")
                in_subset[file] = (c, path)
                if not view:
                    if file in seen:
                        other, oc, other_path = seen[file]
                        same = "" if other_path == path else f" (there as {other_path!r})"
                        raise ValueError(f"{name}: {path!r} is in subset {other!r} class {oc}{same} and in subset "
                                         f"{key!r} class {c}; classes must be disjoint across subsets")
                    seen[file] = (key, c, path)
                if check_files and root is not None:
                    num_images += 1
                    if not os.path.isfile(file):
                        missing.append((key, c, path))
                    else:
                        to_read.setdefault(file, (key, c, path))
    if missing:
        key, c, path = missing[0]
        more = f" ({len(missing)} of {num_images} images missing)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"{name}: subset {key!r} class {c}: image {path!r} not found under root "
                                f"{os.fspath(root)!r}{more}")
    bad = unreadable_images(list(to_read))
    if bad:
        file, reason = bad[0]
        key, c, path = to_read[file]
        more = f" ({len(bad)} of {len(to_read)} images unreadable)" if len(bad) > 1 else ""
        raise ValueError(f"{name}: subset {key!r} class {c}: image {path!r} under root {os.fspath(root)!r} is not "
                         f"a readable image: {reason}{more}")


def resolve_image_path(path: str, root: str, where: str = "split") -> str:
    """The normalised file name of a split entry: ``path`` joined to ``root`` (absolute) and normalised
    lexically (``./``, ``//`` and ``..`` collapsed; symbolic links are not followed). An absolute
    ``path`` is taken as it is; a relative one that leaves ``root`` (``../x``) is refused naming
    ``where``: a split lists files inside its dataset folder unless it says otherwise with an absolute path."""
    if os.path.isabs(path):
        return os.path.normpath(path)
    norm = os.path.normpath(path)
    if norm == os.curdir or norm == os.pardir or norm.startswith(os.pardir + os.sep):
        raise ValueError(f"{where}: image path {path!r} leaves the dataset root {root or '.'!r} "
                         f"(normalised: {norm!r}); write an absolute path for a file outside it")
    return os.path.join(root, norm) if root else norm


def unreadable_images(files: Sequence[str]) -> List[Tuple[str, str]]:
    """``[(file, reason)]`` for every file whose header Pillow cannot read as an image, in input order.

    ``PIL.Image.open`` reads the header only (format, mode, size), not the pixels: a file that is not an
    image, is empty or cut inside its header is found here, when the split is loaded, rather than in a
    data-loader worker after the model is built. About 45 us per file (0.16 s for the 3,614 images of
    cjk-glyphs-mini on one core; a thread pool was slower there). A file whose pixel data is cut short
    passes and fails when it is decoded, naming the file (``lib.data.datasets.load_image``)."""
    from PIL import Image

    bad = []
    for file in files:
        try:
            with Image.open(file) as image:
                if image.width < 1 or image.height < 1:
                    bad.append((file, f"empty image ({image.width}x{image.height})"))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            bad.append((file, f"{type(e).__name__}: {e}"))
    return bad


def _dumps(split: Split) -> str:
    """JSON with one top-level key per line and, in subsets, one class per line (readable diffs)."""
    lines = []
    for key, value in split.items():
        if key in DISJOINT_SUBSETS + VIEW_SUBSETS and isinstance(value, list) and value:
            body = ",\n".join("    " + json.dumps(c) for c in value)
            lines.append(f"  {json.dumps(key)}: [\n{body}\n  ]")
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def _publish(tmp: str, path: os.PathLike) -> None:
    """Rename a finished temporary file over ``path`` with the usual 0666 & ~umask mode (``mkstemp``
    creates files readable by their owner only)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def save_split_json(split: Split, path: str | os.PathLike) -> None:
    """Write ``split`` as JSON atomically (a temporary file renamed over ``path``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(_dumps(split))
        _publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_split_json(path: str | os.PathLike) -> Split:
    """Read a split JSON; a missing file or malformed JSON raises naming the file (structure is checked
    by :func:`validate_split`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file {os.fspath(path)!r} not found")
    try:
        with open(path) as f:
            split = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"split file {os.fspath(path)!r} is not valid JSON: {e}") from None
    if not isinstance(split, dict):
        raise ValueError(f"split file {os.fspath(path)!r}: expected a JSON object with 'train' and 'test', "
                         f"got {type(split).__name__}")
    return split


# ----------------------------------------------------------------------------------------------------
# DatasetSplit and load_split
# ----------------------------------------------------------------------------------------------------

@dataclass
class DatasetSplit:
    """A split dict with the folder its relative paths live in."""

    name: str
    root: str
    split: dict = field(repr=False)

    def subset(self, which: str) -> Tuple[List[str], List[int]]:
        """``(absolute paths, labels)`` of a subset; labels are the class indices 0..C-1 within it."""
        if which not in self.split or not isinstance(self.split[which], list):
            raise ValueError(f"dataset {self.name!r} has no subset {which!r}; it has: {', '.join(_subsets(self.split))}")
        root = os.path.abspath(self.root)
        paths, labels = [], []
        for label, cls in enumerate(self.split[which]):
            paths.extend(os.path.normpath(os.path.join(root, p)) for p in cls)
            labels.extend([label] * len(cls))
        return paths, labels

    def summary(self) -> Dict[str, Dict[str, int]]:
        return split_summary(self.split)


def _atomic_cache(split: Split, path: Path) -> None:
    try:
        save_split_json(split, path)
    except OSError as e:  # a read-only checkout still works, it just rebuilds every time
        warnings.warn(f"could not cache the split at {path}: {e}", RuntimeWarning, stacklevel=3)


def _folder_split(directory: Path, val_ratio: float) -> Split:
    classes = sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    lists = []
    for cls in classes:
        images = sorted(p.relative_to(directory).as_posix() for p in cls.rglob("*")
                        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
        if not images:
            raise ValueError(f"class folder {os.fspath(cls)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        lists.append(images)
    if len(lists) < 2:
        raise ValueError(f"{os.fspath(directory)!r}: a class-folder dataset needs at least 2 class "
                         f"sub-folders (train and test classes are disjoint), found {len(lists)}")
    num_train = (len(lists) + 1) // 2
    train, val = carve_val(lists[:num_train], val_ratio)
    return {"train": train, "val": val, "test": lists[num_train:], "val_ratio": float(val_ratio)}


def _dataset_root(name: str, data_root: str) -> str:
    candidates = [f if os.path.isabs(f) else os.path.join(data_root, f) for f in _INFO[name].folders]
    for c in candidates:
        if os.path.isdir(c):
            return c
    return candidates[0]


def _unknown(name: str) -> ValueError:
    return ValueError(
        f"unknown dataset {name!r}; registered datasets: {', '.join(sorted(DATASETS))}. A dataset can also "
        "be given as the path of a split JSON file (paths relative to --data-root, or to its \"root\" key), "
        "or as folder:/path/to/dir with one sub-folder of images per class.")


def load_split(name: str, data_root: str = "data", val_ratio: float = 0.5,
               splits_dir: str | os.PathLike | None = None, *, check_files: bool = True) -> DatasetSplit:
    """Resolve ``name`` to a validated :class:`DatasetSplit` (see the module docstring for the three forms).

    ``splits_dir`` (default :data:`SPLITS_DIR`, the repository's ``splits/``) holds the cached splits of
    registered datasets; a cache whose ``val_ratio`` differs from ``val_ratio`` is rebuilt and rewritten.
    A user JSON with a ``val_ratio`` key is re-carved (train + val, class order kept) when it differs; one
    without the key keeps its own non-empty ``val`` and gets one carved otherwise.
    """
    carve_val([], val_ratio)  # checks the range
    name = os.fspath(name)
    splits_dir = Path(SPLITS_DIR if splits_dir is None else splits_dir)

    if name.endswith(".json") and os.path.isfile(name):
        split = load_split_json(name)
        label = f"split file {name!r}"
        root = data_root
        if "root" in split:
            if not isinstance(split["root"], str) or not split["root"]:
                raise ValueError(f"{label}: \"root\" must be a non-empty string, got {split['root']!r}")
            root = os.path.join(os.path.dirname(os.path.abspath(name)), os.path.expanduser(split["root"]))
        validate_split(split, root, check_files=check_files, name=label)
        if "val_ratio" in split:
            if float(split["val_ratio"]) != float(val_ratio):
                split = recarve(split, val_ratio)
        elif not split.get("val"):
            split = recarve(split, val_ratio)
        return DatasetSplit(Path(name).stem, root, split)

    if name.startswith("folder:") or (os.path.isdir(name) and name not in DATASETS):
        directory = Path(name[len("folder:"):] if name.startswith("folder:") else name).expanduser()
        if not directory.is_dir():
            raise FileNotFoundError(f"dataset folder {os.fspath(directory)!r} not found")
        split = _folder_split(directory, val_ratio)
        validate_split(split, directory, check_files=check_files, name=f"folder {os.fspath(directory)!r}")
        return DatasetSplit(directory.name, os.fspath(directory), split)

    if name not in DATASETS:
        if name.endswith(".json") or "/" in name or os.sep in name:
            raise FileNotFoundError(f"dataset {name!r}: no such split file or folder. " + str(_unknown(name)))
        raise _unknown(name)

    info = _INFO.get(name, _DatasetInfo((name,), True))
    _INFO.setdefault(name, info)
    root = _dataset_root(name, data_root)
    cache_path = splits_dir / f"{name}.json"
    split = None
    if info.cache and cache_path.is_file():
        cached = load_split_json(cache_path)
        if _same_ratio(cached.get("val_ratio"), val_ratio):
            split, label = cached, f"cached split {os.fspath(cache_path)!r} (delete it to rebuild)"
            if info.prepare is not None:
                info.prepare(split, root)
    built = split is None
    if built:
        label = f"dataset {name!r}"
        split = DATASETS[name](root, val_ratio)
        if not isinstance(split, dict):
            raise ValueError(f"{label}: the builder must return a split dict, got {type(split).__name__}")
        split = {"name": name, "format": SPLIT_FORMAT, **split}  # the same dict as its cached copy
        split.setdefault("val", [])
        split["val_ratio"] = float(val_ratio)
    validate_split(split, root, check_files=check_files, name=label)
    if built and info.cache:
        _atomic_cache(split, cache_path)
    return DatasetSplit(name, root, split)


def _same_ratio(stored, val_ratio: float) -> bool:
    try:
        return stored is not None and abs(float(stored) - float(val_ratio)) < 1e-12
    except (TypeError, ValueError):
        return False


# ----------------------------------------------------------------------------------------------------
# builders of the official distributions
# ----------------------------------------------------------------------------------------------------

def _read_lines(path: str, skip: int = 0) -> List[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} not found (see docs for the expected dataset layout)")
    with open(path) as f:
        lines = f.read().splitlines()
    return [line for line in lines[skip:] if line.strip()]


def _train_val_test(train_classes: list, test_classes: list, val_ratio: float) -> Split:
    train, val = carve_val(train_classes, val_ratio)
    return {"train": train, "val": val, "test": test_classes, "val_ratio": float(val_ratio)}


@register_dataset("cub", folders=("cub", "CUB_200_2011", "cub/CUB_200_2011"))
def build_cub(root: str, val_ratio: float) -> Split:
    """CUB-200-2011 (Wah et al. 2011): classes 1-100 train (val carved), 101-200 test, by class id.

    Reads ``images.txt`` (``image_id images-relative-path``); paths become ``images/<path>``.
    """
    classes: Dict[int, list] = {}
    for n, line in enumerate(_read_lines(os.path.join(root, "images.txt")), 1):
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{os.path.join(root, 'images.txt')!r} line {n}: expected 'id path', got {line!r}")
        try:
            class_id = int(parts[1].split(".", 1)[0])
        except ValueError:
            raise ValueError(f"{os.path.join(root, 'images.txt')!r} line {n}: path {parts[1]!r} does not start "
                             "with 'NNN.' (the class id)") from None
        classes.setdefault(class_id, []).append("images/" + parts[1])
    ids = sorted(classes)
    return _train_val_test([classes[i] for i in ids if i <= 100], [classes[i] for i in ids if i > 100], val_ratio)


@register_dataset("cars", folders=("cars", "cars196", "CARS196"))
def build_cars(root: str, val_ratio: float) -> Split:
    """Cars196 (Krause et al. 2013), all 16,185 images of ``cars_annos.mat``: classes 1-98 train, 99-196 test."""
    from scipy.io import loadmat

    mat_path = os.path.join(root, "cars_annos.mat")
    if not os.path.isfile(mat_path):
        raise FileNotFoundError(f"{mat_path!r} not found (Cars196: cars_annos.mat beside car_ims/)")
    try:
        annotations = loadmat(mat_path)["annotations"].ravel()
        fields = annotations.dtype.names
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{mat_path!r}: expected a struct array 'annotations' ({e})") from None
    for f in ("relative_im_path", "class"):
        if f not in fields:
            raise ValueError(f"{mat_path!r}: 'annotations' lacks the field {f!r} (has {fields})")
    classes: Dict[int, list] = {}
    for entry in annotations:
        path = str(np.asarray(entry["relative_im_path"]).ravel()[0])
        classes.setdefault(int(np.asarray(entry["class"]).ravel()[0]), []).append(path)
    ids = sorted(classes)
    return _train_val_test([classes[i] for i in ids if i <= 98], [classes[i] for i in ids if i > 98], val_ratio)


def _sop_classes(path: str) -> list:
    classes: Dict[str, list] = {}
    for n, line in enumerate(_read_lines(path, skip=1), 2):
        parts = line.split()
        if len(parts) != 4:
            raise ValueError(f"{path!r} line {n}: expected 'image_id class_id super_class_id path', got {line!r}")
        classes.setdefault(parts[1], []).append(parts[3])
    return list(classes.values())


@register_dataset("sop", folders=("sop", "Stanford_Online_Products"))
def build_sop(root: str, val_ratio: float) -> Split:
    """Stanford Online Products (Oh Song et al. 2016): ``Ebay_train.txt`` classes train (val carved, file
    order), ``Ebay_test.txt`` classes test."""
    return _train_val_test(_sop_classes(os.path.join(root, "Ebay_train.txt")),
                           _sop_classes(os.path.join(root, "Ebay_test.txt")), val_ratio)


@register_dataset("inshop", folders=("inshop", "In-Shop", "InShop"))
def build_inshop(root: str, val_ratio: float) -> Split:
    """In-Shop Clothes Retrieval (Liu et al. 2016) from ``list_eval_partition.txt``.

    Items with status ``train`` -> train/val (file order). Test items (``query`` and ``gallery``) ->
    ``test`` holds each item's query and gallery images together (the all-vs-all protocol used for every
    other dataset), and ``query`` / ``gallery`` hold the same classes in the same order split by status,
    for the official protocol (query images against the gallery only). An item may be empty in one of them.
    """
    path = os.path.join(root, "list_eval_partition.txt")
    train: Dict[str, list] = {}
    query: Dict[str, list] = {}
    gallery: Dict[str, list] = {}
    for n, line in enumerate(_read_lines(path, skip=2), 3):
        parts = line.split()
        if len(parts) != 3 or parts[2] not in ("train", "query", "gallery"):
            raise ValueError(f"{path!r} line {n}: expected 'image_name item_id train|query|gallery', got {line!r}")
        image, item, status = parts
        if status == "train":
            train.setdefault(item, []).append(image)
        else:
            query.setdefault(item, [])
            gallery.setdefault(item, [])
            (query if status == "query" else gallery)[item].append(image)
    items = list(query)
    overlap = set(train) & set(items)
    if overlap:
        raise ValueError(f"{path!r}: item {sorted(overlap)[0]!r} is both a train and a test item")
    split = _train_val_test(list(train.values()), [query[i] + gallery[i] for i in items], val_ratio)
    split["query"] = [query[i] for i in items]
    split["gallery"] = [gallery[i] for i in items]
    return split


# --- Fashion-MNIST ---------------------------------------------------------------------------------

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FASHION_MNIST_SYSTEM_DIRS = ("/usr/share/datasets/fashion-mnist",)
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (LeCun's MNIST format, gzip optional): 2 zero bytes, a type byte, the number of
    dimensions, the big-endian uint32 sizes, then the payload."""
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path!r}: cannot read IDX file ({e})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path!r}: not an IDX file (bad magic {data[:4].hex()})")
    ndim = data[3]
    dims = np.frombuffer(data, ">u4", count=ndim, offset=4).astype(int) if len(data) >= 4 + 4 * ndim else None
    if dims is None:
        raise ValueError(f"{path!r}: truncated IDX header")
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    count = int(np.prod(dims))
    offset = 4 + 4 * ndim
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(f"{path!r}: IDX payload has {len(data) - offset} bytes, the header says "
                         f"{count * dtype.itemsize} ({tuple(dims)})")
    return np.frombuffer(data, dtype, count=count, offset=offset).reshape(tuple(dims))


def find_fashion_mnist(dirs: Iterable[str]) -> Dict[str, str]:
    """``{'train-images': path, ...}`` of the four IDX files in the first folder holding all of them."""
    dirs = list(dirs)
    for d in dirs:
        found = {}
        for part in ("train", "t10k"):
            for kind in ("images-idx3", "labels-idx1"):
                for ext in ("-ubyte", "-ubyte.gz", ".ubyte", ".ubyte.gz"):
                    p = os.path.join(d, f"{part}-{kind}{ext}")
                    if os.path.isfile(p):
                        found[f"{part}-{kind.split('-')[0]}"] = p
                        break
        if len(found) == 4:
            return found
    raise FileNotFoundError("Fashion-MNIST IDX files {train,t10k}-{images-idx3,labels-idx1}-ubyte(.gz) not found; "
                            f"looked in: {', '.join(dirs)} (Debian/Ubuntu: apt install dataset-fashion-mnist)")


def write_png(array: np.ndarray, path: str | os.PathLike, optimize: bool = True) -> None:
    """Save a 2-D uint8 array as a grayscale PNG atomically (temporary file, then rename)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8), mode="L").save(f, format="PNG",
                                                                                       optimize=optimize)
        _publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def fashion_mnist_path(label: int, part: str, index: int) -> str:
    """``images/<label>/<part>_<index:05d>.png``: image ``index`` of the ``train`` or ``t10k`` IDX files."""
    return f"images/{int(label)}/{part}_{int(index):05d}.png"


@register_dataset("fashion-mnist")
def build_fashion_mnist(root: str, val_ratio: float) -> Split:
    """Fashion-MNIST (Xiao, Rasul & Vollgraf 2017, Zalando, MIT), all 70,000 images made class-disjoint:
    classes 0-4 (T-shirt/top, Trouser, Pullover, Dress, Coat) train (val carved), 5-9 test.

    The IDX files are read from ``root`` or Debian's ``/usr/share/datasets/fashion-mnist``; every image is
    written once as ``<root>/images/<class>/<train|t10k>_<index>.png`` (existing files are kept; each is
    written to a temporary file and renamed, so an interrupted run leaves no partial PNG). Within a class,
    the train images come first, then the t10k ones, each in file order.
    """
    files = find_fashion_mnist([root, *FASHION_MNIST_SYSTEM_DIRS])
    classes: List[list] = [[] for _ in range(10)]
    for part in ("train", "t10k"):
        images, labels = read_idx(files[f"{part}-images"]), read_idx(files[f"{part}-labels"])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"Fashion-MNIST {part} files {files[part + '-images']!r}, {files[part + '-labels']!r}: "
                             f"images {images.shape} and labels {labels.shape} do not match")
        for index, (image, label) in enumerate(zip(images, labels.astype(np.int64))):
            if not 0 <= label < 10:
                raise ValueError(f"{files[part + '-labels']!r}: label {label} of image {index} is not in 0..9")
            rel = fashion_mnist_path(label, part, index)
            target = os.path.join(root, rel)
            if not os.path.isfile(target):
                write_png(image, target, optimize=False)
            classes[label].append(rel)
    return _train_val_test(classes[:5], classes[5:], val_ratio)


MINI_NAME = "fashion-mnist-mini"
MINI_ROOT = REPO_ROOT / "data" / MINI_NAME
MINI_SPLIT = SPLITS_DIR / f"{MINI_NAME}.json"


def mini_class_folder(label: int) -> str:
    """``'0_T-shirt_top'``, ..., ``'9_Ankle_boot'``: class index and name, ``/`` and spaces made ``_``."""
    return f"{int(label)}_" + FASHION_MNIST_CLASSES[int(label)].replace("/", "_").replace(" ", "_")


@register_dataset(MINI_NAME, folders=(MINI_NAME, os.fspath(MINI_ROOT)))
def build_fashion_mnist_mini(root: str, val_ratio: float) -> Split:
    """The embedded default: the first 200 Fashion-MNIST t10k images of each class, committed as
    ``data/fashion-mnist-mini/<class>_<name>/<t10k index:04d>.png`` (``tools/make_embedded_data.py``).

    Classes 0-4 train (val carved: at 0.5 the first ``int(5 * 0.5) = 2`` classes train, 3 validate),
    5-9 test. Reads the class folders, so any ``val_ratio`` re-carves; the split at 0.5 is committed as
    ``splits/fashion-mnist-mini.json``. ``root`` is ``<data_root>/fashion-mnist-mini`` when that exists,
    else the repository's copy (so the default works from any working directory).
    """
    folders = [mini_class_folder(c) for c in range(10)]
    classes = []
    for folder in folders:
        directory = os.path.join(root, folder)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"{MINI_NAME}: class folder {directory!r} not found "
                                    "(regenerate with python tools/make_embedded_data.py)")
        names = sorted(n for n in os.listdir(directory) if n.lower().endswith(".png") and not n.startswith("."))
        if not names:
            raise ValueError(f"{MINI_NAME}: class folder {directory!r} holds no PNG images")
        classes.append([f"{folder}/{n}" for n in names])
    split = _train_val_test(classes[:5], classes[5:], val_ratio)
    split["description"] = (f"Fashion-MNIST t10k, first {len(classes[0])} images per class; classes 0-4 "
                            "train/val, 5-9 test; paths relative to data/fashion-mnist-mini")
    split["classes"] = list(FASHION_MNIST_CLASSES)
    return split


# --- CJK glyphs (lib/data/glyphs.py) ------------------------------------------------------------

def _materialize_glyphs(split: Split, root: str) -> None:
    from lib.data.glyphs import materialize

    materialize(split, root)


@register_dataset("cjk-glyphs", prepare=_materialize_glyphs)
def build_cjk_glyphs(root: str, val_ratio: float) -> Split:
    """CJK ideographs drawn by 21 Debian fonts (:mod:`lib.data.glyphs`): 500 training characters (val
    carved), 500 test characters, 14-21 drawings each at 128 px, rendered into ``root`` on first use."""
    from lib.data.glyphs import build_glyph_split

    return build_glyph_split(root, val_ratio)


GLYPHS_MINI = "cjk-glyphs-mini"


@register_dataset(GLYPHS_MINI, folders=(GLYPHS_MINI, os.fspath(REPO_ROOT / "data" / GLYPHS_MINI)),
                  prepare=_materialize_glyphs)
def build_cjk_glyphs_mini(root: str, val_ratio: float) -> Split:
    """The embedded default: 120 training characters (val carved: 60 train, 60 validate at 0.5) and 80
    test characters of ``cjk-glyphs``, all their 14-21 drawings, at 128 px, committed under
    ``data/cjk-glyphs-mini`` (``tools/make_embedded_data.py --glyphs``); rebuilt from
    ``splits/cjk-glyphs.json``'s record (fonts needed only for images that are missing)."""
    from lib.data.glyphs import build_glyph_subset

    source = load_split_json(SPLITS_DIR / "cjk-glyphs.json")
    return build_glyph_subset(root, val_ratio, source, num_train=120, num_test=80, size=128, name=GLYPHS_MINI)


__all__ = [
    "DATASETS", "IMAGE_EXTENSIONS", "SPLITS_DIR", "DatasetSplit", "FASHION_MNIST_CLASSES", "carve_val", "load_split", "load_split_json",
    "parse_dataset_spec", "read_idx", "recarve", "register_dataset", "resolve_image_path", "save_split_json",
    "split_summary", "trainval", "unreadable_images", "validate_split",
]
