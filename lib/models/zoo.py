"""Named models: the paper's published checkpoints and plain names of files in ``pretrained/``."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

PUBLISHED_URL = "http://ptak.felk.cvut.cz/personal/sumapave/public/{}.pth"
# Suma & Tolias, WACV 2023: teachers trained with the triplet loss at 448 and 224 px, and the
# students distilled to 224 px from the 448 px teachers (ResNet50, GeM, whitening to 512).
PUBLISHED = tuple(
    [f"{d}-{s}r-resnet50-512-gem-w" for d in ("cub", "cars", "sop") for s in (448, 224)]
    + [f"{d}-S224r-T448r-resnet50-512-gem-w" for d in ("cub", "cars", "sop")]
)
DEFAULT_DIR = Path(__file__).resolve().parents[2] / "pretrained"


def resolve_model_path(name: str, pretrained_dir: Optional[str | os.PathLike] = None, download: bool = True) -> Path:
    """A checkpoint path for ``name``: an existing file, ``pretrained/<name>[.pth|.pt]``, or a published
    model downloaded into ``pretrained/`` (offline, the error says which file to put where)."""
    directory = Path(pretrained_dir) if pretrained_dir else DEFAULT_DIR
    path = Path(name).expanduser()
    if path.is_file():
        return path
    for candidate in (directory / name, directory / f"{name}.pth", directory / f"{name}.pt"):
        if candidate.is_file():
            return candidate
    if name in PUBLISHED:
        target = directory / f"{name}.pth"
        url = PUBLISHED_URL.format(name)
        if download:
            try:
                from torch.hub import download_url_to_file

                directory.mkdir(parents=True, exist_ok=True)
                download_url_to_file(url, str(target), progress=True)  # writes a temp file, then renames
                return target
            except Exception as err:  # offline, or the server is gone
                raise FileNotFoundError(
                    f"published model {name!r} is not in {directory} and could not be downloaded ({err}). "
                    f"Download {url} elsewhere and put it at {target}"
                ) from err
        raise FileNotFoundError(f"published model {name!r}: put {url} at {target}")
    raise FileNotFoundError(
        f"no checkpoint {name!r}: not a file, not in {directory}, and not a published model "
        f"({', '.join(PUBLISHED)})"
    )


__all__ = ["PUBLISHED", "PUBLISHED_URL", "resolve_model_path"]
