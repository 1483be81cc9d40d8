"""Checkpoints: tensors and plain Python only, written atomically, read with ``weights_only=True``.

A *network* checkpoint is ``{'meta': {...}, 'state_dict': {...}, ...}``: ``meta`` rebuilds the
architecture (``lib.models.network_from_meta``; reading one back: ``lib.models.loading``), so
``test.py --student-path`` needs nothing else.
A *training* checkpoint adds optimizer, scheduler, scaler, epoch, RNG states and the config.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Sequence

import torch

from lib.utils import atomic_write

if TYPE_CHECKING:  # annotations only: lib.models.loading imports this module
    from lib.models.net import RetrievalNet


#: key of the content checksum that :func:`atomic_save` adds to every checkpoint dict
CHECKSUM_KEY = "checksum"


def _feed(digest, obj: Any) -> None:
    """Hash ``obj`` (what ``torch.save`` / ``weights_only`` round-trips: tensors, dicts, lists, tuples,
    numbers, strings, None) by value and structure; dict order as stored (pickle keeps it)."""
    if isinstance(obj, torch.Tensor):
        tensor = obj.detach().cpu().contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
        if tensor.numel():
            digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    elif isinstance(obj, dict):
        digest.update(f"D{len(obj)}".encode())
        for key, value in obj.items():
            _feed(digest, key)
            _feed(digest, value)
    elif isinstance(obj, (list, tuple)):
        digest.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}".encode())
        for value in obj:
            _feed(digest, value)
    else:
        digest.update(f"V{type(obj).__name__}:{obj!r};".encode())


def content_checksum(state: Dict[str, Any]) -> str:
    """``'sha256:<hex>'`` of everything in a checkpoint dict but its own checksum entry: every tensor's
    dtype, shape and bytes, and every plain value (config, history, epoch), so that a flipped byte
    anywhere in the tensors' data or the plain data is found when the file is read."""
    digest = hashlib.sha256()
    _feed(digest, {k: v for k, v in state.items() if k != CHECKSUM_KEY})
    return "sha256:" + digest.hexdigest()


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``:
    a run killed mid-write leaves the previous file intact (and a temporary file that the next write
    to ``path`` removes, see :func:`lib.utils.atomic_write`). A dict gets a content checksum
    (:func:`content_checksum`) that :func:`load_checkpoint` verifies."""
    if isinstance(obj, dict):
        obj = {**{k: v for k, v in obj.items() if k != CHECKSUM_KEY}, CHECKSUM_KEY: content_checksum(obj)}

    def write(tmp):
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())

    atomic_write(path, write)


_UNVERIFIED: set = set()


def load_checkpoint(path: str | os.PathLike, verify: bool = True) -> Dict[str, Any]:
    """Read a checkpoint safely (no arbitrary unpickling); errors name the file.

    With ``verify`` the content checksum written by :func:`atomic_save` is checked (a mismatch raises
    ``ValueError`` naming the file) and removed from the returned dict. A checkpoint written before
    checksums were stored (or by other code, e.g. the published ones) loads unverified, with a
    warning, once per file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"checkpoint {path} is unreadable or not a weights-only checkpoint: {err}") from err
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} holds {type(state).__name__}, expected a dict")
    stored = state.pop(CHECKSUM_KEY, None)
    if verify and stored is not None:
        computed = content_checksum(state)
        if computed != stored:
            raise ValueError(f"checkpoint {path} is corrupt: its contents do not match the checksum stored when it was "
                             f"written ({stored[:19]}..., now {computed[:19]}...); restore it from a copy or delete it")
    elif verify and str(path) not in _UNVERIFIED:
        _UNVERIFIED.add(str(path))
        warnings.warn(f"checkpoint {path} has no content checksum (written by older code or elsewhere): loaded "
                      "without verification", stacklevel=2)
    return state


def network_state(net: RetrievalNet, **extra: Any) -> Dict[str, Any]:
    state = {"meta": dict(net.meta), "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()}}
    state.update(extra)
    return state


def check_compatible(net: RetrievalNet, state: Dict[str, Any], source: str) -> None:
    """Refuse to resume ``net`` from a checkpoint of another architecture, with both named."""
    meta = state.get("meta", {})
    keys = ("architecture", "pooling", "whitening")
    mine = {k: net.meta.get(k) for k in keys}
    theirs = {k: meta.get(k) for k in keys}
    if mine != theirs:
        raise ValueError(f"{source} was saved for {theirs}, but this run builds {mine}")


def tensor_fingerprint(state_dict: Dict[str, torch.Tensor]) -> str:
    """Content hash of a state dict (names, dtypes, shapes and values)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


#: metadata that says how a network was used, not what it computes: left out of its fingerprint
_USAGE_META = ("checkpoint", "image_size", "teacher_fingerprint")


def network_fingerprint(net: RetrievalNet, ignore: Sequence[str] = _USAGE_META) -> str:
    """The identity of the embedding space a network computes: sha256 of its tensors (names, dtypes,
    shapes, values) and of the metadata that defines its function (architecture, pooling, whitening,
    mean, std, ...), leaving out where it was loaded from and the image size it was last used at.

    A distilled student records its teacher's fingerprint (``teacher_fingerprint`` in its checkpoint);
    a database index records the fingerprint of the network that embedded it; ``search.py`` compares
    the two. ``ignore`` names the metadata left out (``lib.cache`` keys its embedding cache with a
    stricter hash that keeps the image size and the teacher).
    """
    meta = {k: v for k, v in net.meta.items() if k not in ignore}
    digest = hashlib.sha256(tensor_fingerprint(net.state_dict()).encode())
    digest.update(json.dumps(meta, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def __getattr__(name: str):
    """``get_network``, ``load_network`` and ``network_from_state`` moved to :mod:`lib.models.loading`;
    still importable from here for code written against the old place (loaded lazily: that module
    imports this one)."""
    if name in ("get_network", "load_network", "network_from_state"):
        from lib.models import loading

        return getattr(loading, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CHECKSUM_KEY", "atomic_save", "content_checksum", "load_checkpoint", "network_state",
           "check_compatible", "tensor_fingerprint", "network_fingerprint"]
