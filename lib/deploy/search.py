"""Queries embedded by the student (a PyTorch checkpoint or an exported model), checked against the
index's embedding space, ranked by a backend, reported as plain dicts (JSON).

The pairing check: the student and the index must share the dimension, and the network that embedded
the index must be the teacher the student was distilled against (``teacher_fingerprint`` in the
student's checkpoint or export, compared with the index's ``fingerprint``) or the student itself (a
symmetric search). A student that records no teacher is refused unless the caller trusts the pair.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from lib.checkpoint import load_checkpoint, network_fingerprint
from lib.models.loading import network_from_state
from lib.data.datasets import ImageList
from lib.data.transforms import EvalTransform
from lib.deploy.index import Backend, DatabaseIndex
from lib.extract import extract
from lib.models.net import RetrievalNet
from lib.models.zoo import resolve_model_path


class PairMismatchError(ValueError):
    """The query network and the index do not embed into one space."""


def _short(fingerprint: Optional[str]) -> str:
    return fingerprint[:12] if fingerprint else "none"


def is_torchscript(path: Path) -> bool:
    """A TorchScript archive (a zip with a ``code/`` folder), not a state-dict checkpoint."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


@dataclass
class QueryEncoder:
    """Images -> (N, D) unit rows with the student, at its query resolution, with its own mean/std.

    ``net`` (PyTorch) or ``exported`` (:class:`lib.deploy.export.ExportedModel`) computes them;
    ``fingerprint`` is the student's own, ``teacher_fingerprint`` the teacher's it was distilled against.
    """

    name: str
    image_size: int
    mean: List[float]
    std: List[float]
    dim: int
    fingerprint: Optional[str]
    teacher_fingerprint: Optional[str]
    net: Optional[RetrievalNet] = None
    exported: Any = None
    kind: str = "pytorch"

    @torch.no_grad()
    def encode(self, paths: Sequence[str], *, batch_size: int = 64, workers: int = 0,
               device: torch.device | str = "cpu") -> Tensor:
        if self.net is not None:
            return extract(self.net, paths, self.image_size, device=device, batch_size=batch_size, workers=workers)
        loader = DataLoader(ImageList(list(paths), transform=EvalTransform(self.image_size, self.mean, self.std)),
                            batch_size=batch_size, shuffle=False, num_workers=workers)
        return torch.cat([self.exported(images) for images, _, _ in loader]) if len(paths) else torch.empty(0, self.dim)


def load_query_encoder(name_or_path: str, *, image_size: Optional[int] = None, threads: Optional[int] = None,
                       pretrained_dir: Optional[str] = None) -> QueryEncoder:
    """A student checkpoint (``model_best.pth``, a file in ``pretrained/`` or a published name), an ONNX
    export (``.onnx``) or a TorchScript export; ``image_size`` overrides a checkpoint's training size
    (an export has its size built in)."""
    path = Path(name_or_path)
    if path.suffix == ".onnx" or (path.is_file() and is_torchscript(path)):
        from lib.deploy.export import load_exported

        model = load_exported(path, threads=threads)
        c = model.contract
        if image_size and int(image_size) != model.image_size:
            raise ValueError(f"{path} was exported for {model.image_size}px inputs; --image-size {image_size} "
                             "does not apply (export it again at that size)")
        return QueryEncoder(str(path), model.image_size, list(c["mean"]), list(c["std"]), model.outputdim,
                            c.get("network_fingerprint"), c.get("teacher_fingerprint") or None,
                            exported=model, kind=model.kind)
    resolved = resolve_model_path(name_or_path, pretrained_dir)
    state = load_checkpoint(resolved)
    net = network_from_state(state, str(resolved)).eval()
    net.meta["checkpoint"] = str(resolved)
    size = image_size or net.meta.get("image_size")
    if not size:
        raise ValueError(f"{resolved} records no training image size: give --image-size")
    return QueryEncoder(str(resolved), int(size), list(net.meta["mean"]), list(net.meta["std"]), net.outputdim,
                        network_fingerprint(net), state.get("teacher_fingerprint"), net=net)


def check_pair(encoder: QueryEncoder, index: DatabaseIndex, *, trust: bool = False) -> str:
    """Raise :class:`PairMismatchError` unless ``encoder``'s queries can be ranked against ``index``;
    returns how the pair was established ('asymmetric', 'symmetric' or 'trusted')."""
    where = f"index {index.directory}"
    embedder = index.manifest.get("network", {})
    if encoder.dim != index.dim:
        raise PairMismatchError(
            f"the student {encoder.name} embeds into {encoder.dim} dimensions but {where} holds {index.dim}-dimensional "
            f"embeddings of {embedder.get('architecture')} ({embedder.get('name')}): they are not one space")
    if encoder.teacher_fingerprint and encoder.teacher_fingerprint == index.fingerprint:
        return "asymmetric"
    if encoder.fingerprint and encoder.fingerprint == index.fingerprint:
        return "symmetric"
    if encoder.teacher_fingerprint:
        raise PairMismatchError(
            f"the student {encoder.name} was distilled against teacher {_short(encoder.teacher_fingerprint)}, but "
            f"{where} was embedded by {embedder.get('architecture')} {embedder.get('name')} (fingerprint "
            f"{_short(index.fingerprint)}): another embedding space, the scores would be meaningless. Index the "
            "database with the student's own teacher")
    if trust:
        return "trusted"
    raise PairMismatchError(
        f"the student {encoder.name} records no teacher fingerprint (trained without a teacher, or before "
        f"checkpoints recorded one), so nothing shows that {where} (fingerprint {_short(index.fingerprint)}) is in "
        "its space; pass --trust-pair to search anyway")


def search_embeddings(backend: Backend, queries: Tensor, index: DatabaseIndex, k: int) -> List[List[Dict[str, Any]]]:
    """Top-``k`` hits of each query row: ``[{'rank', 'id', 'path', 'score'}, ...]`` best first."""
    scores, rows = backend.search(queries, k)
    out = []
    for query_scores, query_rows in zip(scores, rows):
        hits = []
        for rank, (score, row) in enumerate(zip(query_scores.tolist(), query_rows.tolist()), 1):
            if row < 0:  # faiss pads with -1 when an approximate search finds fewer than k
                continue
            hits.append({"rank": rank, "id": index.ids[row], "path": index.paths[row], "score": float(score)})
        out.append(hits)
    return out


__all__ = ["PairMismatchError", "QueryEncoder", "load_query_encoder", "check_pair", "search_embeddings", "is_torchscript"]
