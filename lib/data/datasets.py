"""Images from a list of paths: loading any PIL mode as RGB, with errors that name the file.

Datasets here only load (STYLE.md, principle 5): no network, no sampler, no global random state.
"""
from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

WHITE = (255, 255, 255)


class ImageLoadError(OSError):
    """An image that is missing, unreadable or corrupt; the message names the path and the cause."""


def _integer_to_l(image: Image.Image) -> Image.Image:
    """16/32-bit integer grayscale (modes I;16*, I) to 8 bits by ``value / 257`` (65535 -> 255), clipped."""
    array = np.asarray(image).astype(np.float64)
    return Image.fromarray(np.clip(np.rint(array / 257.0), 0, 255).astype(np.uint8), mode="L")


def _float_to_l(image: Image.Image) -> Image.Image:
    """32-bit float grayscale: values in [0, 1] scaled by 255, otherwise taken as 0-255, clipped."""
    array = np.asarray(image, dtype=np.float64)
    finite = array[np.isfinite(array)]
    if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
        array = array * 255.0
    return Image.fromarray(np.clip(np.nan_to_num(np.rint(array)), 0, 255).astype(np.uint8), mode="L")


def _on_white(image: Image.Image) -> Image.Image:
    """Composite an image with alpha over a white background."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: transparency (RGBA, LA, La, PA, P or L with a transparent colour) is
    composited on white, 16/32-bit grayscale is scaled to 8 bits, CMYK/YCbCr/1/L/P are converted."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or (mode in ("P", "L", "RGB") and "transparency" in image.info):
        return _on_white(image)
    if mode.startswith("I;16") or mode == "I":
        return _integer_to_l(image).convert("RGB")
    if mode == "F":
        return _float_to_l(image).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """The fully decoded image at ``path`` as an RGB ``PIL.Image``.

    Raises :class:`ImageLoadError` (an ``OSError``) naming the path and the cause for a missing, unreadable,
    truncated or otherwise corrupt file (truncated files are not silently padded, unlike the reference's
    ``LOAD_TRUNCATED_IMAGES = True``).
    """
    path = os.fspath(path)
    with _load_errors(path), open(path, "rb") as f:
        image = Image.open(f)
        image.load()
        return to_rgb(image)


@contextlib.contextmanager
def _load_errors(path: str):
    """Turn what opening or decoding the image at ``path`` raises into an :class:`ImageLoadError` naming it."""
    try:
        yield
    except FileNotFoundError:
        raise ImageLoadError(f"image {path!r} not found") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageLoadError(f"cannot load image {path!r}: {type(e).__name__}: {e}") from e


def image_size(path: str | os.PathLike) -> Tuple[int, int]:
    """(width, height) of the image at ``path``, read from its header without decoding it (the size
    :func:`load_image` returns). Raises :class:`ImageLoadError` like it for a missing or unreadable file."""
    path = os.fspath(path)
    with _load_errors(path), Image.open(path) as image:
        return image.size


class ImageList(torch.utils.data.Dataset):
    """``dataset[i] = (transform(loader(paths[i])), labels[i], i)``; the label is -1 without ``labels``.

    >>> ds = ImageList(["a.jpg", "b.jpg"], [0, 1], transform=EvalTransform(224))  # doctest: +SKIP
    """

    def __init__(self, paths: Sequence[str], labels: Optional[Sequence[int]] = None,
                 transform: Optional[Callable] = None, loader: Callable = load_image):
        self.paths = [os.fspath(p) for p in paths]
        if labels is not None:
            labels = [int(l) for l in labels]
            if len(labels) != len(self.paths):
                raise ValueError(f"ImageList: {len(self.paths)} paths but {len(labels)} labels")
        self.labels = labels
        self.transform = transform
        self.loader = loader

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tuple[object, int, int]:
        image = self.loader(self.paths[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, (self.labels[index] if self.labels is not None else -1), index

    def __repr__(self) -> str:
        return f"ImageList({len(self)} images, transform={self.transform!r})"


def _check(path: str) -> Optional[str]:
    try:
        load_image(path)
    except ImageLoadError as e:
        return str(e)
    return None


def verify_images(paths: Sequence[str], workers: Optional[int] = None) -> List[Tuple[str, str]]:
    """``[(path, reason), ...]`` for every image of ``paths`` that fails a full decode (in input order).

    Decoding runs on ``workers`` threads (default: up to 8, the number of CPUs); PIL's decoders release
    the GIL, so threads suffice.
    """
    paths = [os.fspath(p) for p in paths]
    workers = workers or min(8, os.cpu_count() or 1)
    if workers <= 1:
        reasons = [_check(p) for p in paths]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            reasons = list(pool.map(_check, paths))
    return [(p, r) for p, r in zip(paths, reasons) if r is not None]


__all__ = ["ImageList", "ImageLoadError", "load_image", "to_rgb", "verify_images"]
