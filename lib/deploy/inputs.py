"""Which images to index or to query: files, folders, a split subset or a file list, as (paths, ids)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

from lib.data.splits import IMAGE_EXTENSIONS, load_split, parse_dataset_spec


@dataclass
class ImageSet:
    """``paths`` (absolute, to read), ``ids`` (short, stable names to report), ``labels`` (class per image
    when the source knows it: a split subset), ``source`` (how the set was given, for the record)."""

    paths: List[str]
    ids: List[str]
    labels: Optional[List[int]] = None
    source: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def images_in_folder(folder: str | os.PathLike) -> List[Path]:
    """Every image file under ``folder`` (recursively, hidden files and folders skipped), sorted."""
    folder = Path(folder)
    found = [p for p in folder.rglob("*") if p.is_file() and is_image(p)
             and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def from_paths(sources: Sequence[str]) -> ImageSet:
    """Image files and folders (searched recursively), in the order given. Ids are the paths relative to
    the one folder given, else to the deepest folder holding every source (unique, short)."""
    paths, bases = [], []
    for source in sources:
        item = Path(source).expanduser()
        if item.is_dir():
            images = images_in_folder(item)
            if not images:
                raise ValueError(f"folder {source!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            paths += [os.path.abspath(p) for p in images]
            bases.append(os.path.abspath(item))
        elif item.is_file():
            paths.append(os.path.abspath(item))
            bases.append(os.path.dirname(os.path.abspath(item)))
        else:
            raise FileNotFoundError(f"image or folder {source!r} does not exist")
    base = bases[0] if len(sources) == 1 and Path(sources[0]).is_dir() else os.path.commonpath(bases) if bases else "."
    ids = [os.path.relpath(p, base).replace(os.sep, "/") for p in paths]
    if len(set(paths)) != len(paths):
        raise ValueError("an image is given twice (a file and a folder holding it, or a repeated source)")
    return ImageSet(paths, ids, source={"kind": "paths", "sources": [str(s) for s in sources]})


def from_file_list(list_file: str | os.PathLike) -> ImageSet:
    """One image path per line (blank lines and ``#`` comments skipped); relative paths are relative to
    the list's folder; the id is the line as written."""
    list_file = Path(list_file)
    if not list_file.is_file():
        raise FileNotFoundError(f"--file-list {list_file} does not exist")
    paths, ids = [], []
    for number, line in enumerate(list_file.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path = Path(line).expanduser()
        path = path if path.is_absolute() else list_file.parent / path
        if not path.is_file():
            raise FileNotFoundError(f"{list_file}, line {number}: image {line!r} not found (looked at {path})")
        paths.append(os.path.abspath(path))
        ids.append(line)
    if not paths:
        raise ValueError(f"--file-list {list_file} lists no image")
    return ImageSet(paths, ids, source={"kind": "file-list", "file": str(list_file)})


def from_dataset(spec: str, data_root: str = "data", val_ratio: float = 0.5) -> ImageSet:
    """A subset of a dataset, ``NAME`` (its test subset here: the images a search runs over),
    ``NAME-test``, ``NAME-val`` or ``NAME-train``; ids are the paths relative to the dataset folder."""
    name, subset = parse_dataset_spec(spec)
    subset = "test" if subset == "train" and not spec.endswith("-train") else subset
    split = load_split(name, data_root, val_ratio=val_ratio)
    paths, labels = split.subset(subset)
    root = os.path.abspath(split.root)
    ids = [os.path.relpath(p, root).replace(os.sep, "/") for p in paths]
    return ImageSet(paths, ids, labels, source={"kind": "dataset", "dataset": name, "subset": subset, "root": root})


def collect_images(paths: Sequence[str] = (), *, dataset: Optional[str] = None, file_list: Optional[str] = None,
                   data_root: str = "data", val_ratio: float = 0.5, flag: str = "images") -> ImageSet:
    """Exactly one of ``paths`` (files and folders), ``dataset`` (a split subset) or ``file_list``."""
    given = [name for name, value in (("paths", list(paths)), ("--dataset", dataset), ("--file-list", file_list)) if value]
    if len(given) != 1:
        raise ValueError(f"give the {flag} one way: image files/folders, --dataset NAME-test or --file-list FILE "
                         f"(got {', '.join(given) if given else 'none'})")
    if dataset:
        return from_dataset(dataset, data_root, val_ratio)
    if file_list:
        return from_file_list(file_list)
    return from_paths(paths)


__all__ = ["ImageSet", "collect_images", "from_paths", "from_file_list", "from_dataset", "images_in_folder"]
