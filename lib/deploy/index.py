"""A database index: the teacher's embeddings of a gallery, written in resumable shards, and the
search backends that rank it.

On disk (``DIR``)::

    manifest.json        what embedded what: network fingerprint and architecture, image size, transform,
                         dimension, number of images, shard size, hash of the image list, complete or not
    items.json           ids and absolute paths, row order
    shards/00000.pt      {'start', 'stop', 'embeddings' (n, D) float32}, one per ``shard_size`` images
    faiss-hnsw.index     approximate structures built by ``index.py --backend`` (optional)

Every file is written to a temporary file and renamed, so a run killed at any point leaves complete
shards only; running the same command again embeds the missing shards and nothing else.

Backends (``BACKENDS``, all ``search(queries (Nq, D), k) -> (scores, rows)``, inner product):

- ``exact``: faiss ``IndexFlatIP`` when faiss imports, else ``torch``;
- ``flat``: faiss ``IndexFlatIP`` (brute force, BLAS);
- ``torch``: the toolkit's own chunked GEMM + top-k, no dependency;
- ``hnsw``: faiss ``IndexHNSWFlat`` (``m``, ``ef_construction``; ``ef_search`` at query time);
- ``ivf``: faiss ``IndexIVFFlat`` on a flat inner-product quantiser (``nlist``; ``nprobe`` at query time).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from lib.checkpoint import atomic_save, load_checkpoint, network_fingerprint
from lib.data.transforms import EvalTransform
from lib.deploy.inputs import ImageSet
from lib.extract import extract
from lib.models.net import RetrievalNet
from lib.registry import Registry
from lib.utils import atomic_write, write_json

INDEX_FORMAT = 1
MANIFEST, ITEMS, SHARDS = "manifest.json", "items.json", "shards"
#: manifest entries that must agree for a run to continue an existing index
_RESUME_KEYS = ("format", "fingerprint", "dim", "image_size", "transform", "num_images", "items_sha256", "shard_size")


def items_hash(ids: Sequence[str], paths: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps([list(ids), list(paths)]).encode()).hexdigest()


def shard_path(directory: Path, number: int) -> Path:
    return Path(directory) / SHARDS / f"{number:05d}.pt"


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is unreadable: {err}") from err


def _valid_shard(path: Path, start: int, stop: int, dim: int) -> bool:
    if not path.is_file():
        return False
    try:
        state = load_checkpoint(path)
    except ValueError:
        return False  # a damaged shard is embedded again
    emb = state.get("embeddings")
    return (state.get("start"), state.get("stop")) == (start, stop) and isinstance(emb, Tensor) \
        and tuple(emb.shape) == (stop - start, dim)


def build_index(net: RetrievalNet, images: ImageSet, directory: str | os.PathLike, image_size: int, *,
                shard_size: int = 4096, batch_size: int = 64, workers: int = 0, device: torch.device | str = "cpu",
                overwrite: bool = False, progress: bool = True, network_name: Optional[str] = None) -> Dict[str, Any]:
    """Embed ``images`` with ``net`` at ``image_size`` into the index folder ``directory``; returns the manifest.

    Continues an unfinished index of the same network, images, size and shard size (complete shards are
    kept). An index of anything else in ``directory`` is refused unless ``overwrite``.
    """
    if len(images) == 0:
        raise ValueError("no image to index")
    if shard_size < 1:
        raise ValueError(f"--shard-size must be positive, got {shard_size}")
    directory = Path(directory)
    transform = EvalTransform(image_size, net.meta["mean"], net.meta["std"]).describe()
    manifest = {
        "format": INDEX_FORMAT, "fingerprint": network_fingerprint(net), "dim": int(net.outputdim),
        "image_size": int(image_size), "transform": transform, "num_images": len(images),
        "items_sha256": items_hash(images.ids, images.paths), "shard_size": int(shard_size),
        "network": {"architecture": net.meta.get("architecture"), "pooling": net.meta.get("pooling"),
                    "whitening": net.meta.get("whitening"), "name": network_name or net.meta.get("checkpoint")},
        "source": images.source, "complete": False, "backends": {},
    }
    manifest_file = directory / MANIFEST
    if manifest_file.is_file():
        existing = _read_json(manifest_file)
        differ = [k for k in _RESUME_KEYS if existing.get(k) != manifest[k]]
        if differ and not overwrite:
            raise ValueError(f"{directory} already holds an index of other content (differs in: {', '.join(differ)}); "
                             "pass --overwrite to replace it, or choose another --index folder")
        if differ:
            shutil.rmtree(directory / SHARDS, ignore_errors=True)
            for old in directory.glob("faiss-*.index"):
                old.unlink()
        elif existing.get("complete"):
            return existing
    directory.mkdir(parents=True, exist_ok=True)
    write_json({"ids": list(images.ids), "paths": list(images.paths),
                **({"labels": list(images.labels)} if images.labels is not None else {})}, directory / ITEMS)
    write_json(manifest, manifest_file)

    num_shards = math.ceil(len(images) / shard_size)
    bounds = [(s * shard_size, min((s + 1) * shard_size, len(images))) for s in range(num_shards)]
    todo = [s for s, (a, b) in enumerate(bounds)
            if not _valid_shard(shard_path(directory, s), a, b, manifest["dim"])]
    done = len(images) - sum(bounds[s][1] - bounds[s][0] for s in todo)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(images), initial=done, unit="img", desc=f"indexing {directory.name}", dynamic_ncols=True,
                   disable=None)
    started = time.time()
    for s in todo:
        a, b = bounds[s]
        emb = extract(net, images.paths[a:b], image_size, device=device, batch_size=batch_size, workers=workers)
        atomic_save({"start": a, "stop": b, "embeddings": emb.contiguous()}, shard_path(directory, s))
        if bar is not None:
            bar.update(b - a)
    if bar is not None:
        bar.close()
    manifest.update(complete=True, embedded_now=len(images) - done,
                    seconds=round(time.time() - started, 3))
    write_json(manifest, manifest_file)
    return manifest


@dataclass
class DatabaseIndex:
    """A complete index read back: ``embeddings`` (N, D) float32 rows in the order of ``ids``/``paths``."""

    directory: Path
    manifest: Dict[str, Any]
    ids: List[str]
    paths: List[str]
    embeddings: Tensor
    labels: Optional[List[int]] = None

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def fingerprint(self) -> str:
        return str(self.manifest["fingerprint"])

    def __len__(self) -> int:
        return len(self.ids)


def load_index(directory: str | os.PathLike) -> DatabaseIndex:
    directory = Path(directory)
    manifest_file = directory / MANIFEST
    if not manifest_file.is_file():
        raise FileNotFoundError(f"{directory} is not an index (no {MANIFEST}); build one with index.py")
    manifest = _read_json(manifest_file)
    if manifest.get("format") != INDEX_FORMAT:
        raise ValueError(f"{manifest_file}: index format {manifest.get('format')!r}, this code reads {INDEX_FORMAT}")
    items = _read_json(directory / ITEMS)
    n, size = int(manifest["num_images"]), int(manifest["shard_size"])
    parts = []
    for s in range(math.ceil(n / size)):
        path = shard_path(directory, s)
        if not path.is_file():
            raise ValueError(f"index {directory} is incomplete: shard {path.name} is missing; run the same "
                             "index.py command again to finish it")
        parts.append(load_checkpoint(path)["embeddings"])
    embeddings = torch.cat(parts).float().contiguous()
    if not manifest.get("complete") or len(embeddings) != n or len(items["ids"]) != n:
        raise ValueError(f"index {directory} is incomplete ({len(embeddings)} of {n} embeddings); run the same "
                         "index.py command again to finish it")
    return DatabaseIndex(directory, manifest, items["ids"], items["paths"], embeddings, items.get("labels"))


# ----------------------------------------------------------------------------------------------------
# search backends
# ----------------------------------------------------------------------------------------------------

BACKENDS = Registry("search backend")


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _faiss():
    try:
        import faiss
    except ImportError as err:
        raise ImportError("this backend needs faiss: pip install faiss-cpu (see requirements.txt); "
                          "--backend torch searches exactly without it") from err
    return faiss


def _rows(x: Tensor | np.ndarray) -> np.ndarray:
    array = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    return np.ascontiguousarray(array, dtype=np.float32).reshape(-1, array.shape[-1])


class Backend:
    """``search(queries (Nq, D), k) -> (scores (Nq, k) float32, rows (Nq, k) int64)``, best first."""

    name = "backend"
    exact = True

    def params(self) -> Dict[str, Any]:
        return {}

    def search(self, queries, k: int) -> Tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


@BACKENDS.register("torch")
class TorchExact(Backend):
    """Exact inner-product top-k by chunked GEMM: ``chunk`` database rows at a time, merged top-k.
    Memory O(Nq x chunk); no dependency beyond torch."""

    name = "torch"

    def __init__(self, embeddings, chunk: int = 65536):
        self.db = torch.from_numpy(_rows(embeddings))
        self.chunk = int(chunk)

    def params(self) -> Dict[str, Any]:
        return {"chunk": self.chunk}

    @torch.no_grad()
    def search(self, queries, k: int) -> Tuple[np.ndarray, np.ndarray]:
        q = torch.from_numpy(_rows(queries))
        k = min(int(k), len(self.db))
        best_scores = torch.full((len(q), 0), float("-inf"))
        best_rows = torch.zeros((len(q), 0), dtype=torch.long)
        for start in range(0, len(self.db), self.chunk):
            sims = q @ self.db[start:start + self.chunk].T
            top = sims.topk(min(k, sims.shape[1]), dim=1)
            scores = torch.cat([best_scores, top.values], 1)
            rows = torch.cat([best_rows, top.indices + start], 1)
            keep = scores.topk(min(k, scores.shape[1]), dim=1).indices
            best_scores, best_rows = scores.gather(1, keep), rows.gather(1, keep)
        return best_scores.numpy(), best_rows.numpy()


class _FaissBackend(Backend):
    def __init__(self, embeddings, index):
        self.index = index
        if index.ntotal == 0:
            self.index.add(_rows(embeddings))

    def search(self, queries, k: int) -> Tuple[np.ndarray, np.ndarray]:
        scores, rows = self.index.search(_rows(queries), min(int(k), self.index.ntotal))
        return scores, rows.astype(np.int64)


@BACKENDS.register("flat")
class FaissFlat(_FaissBackend):
    """faiss ``IndexFlatIP``: exact, brute force."""

    name = "flat"

    def __init__(self, embeddings, index=None):
        faiss = _faiss()
        super().__init__(embeddings, index if index is not None else faiss.IndexFlatIP(_rows(embeddings).shape[1]))


@BACKENDS.register("hnsw")
class FaissHNSW(_FaissBackend):
    """faiss ``IndexHNSWFlat`` (inner product): ``m`` links per node, ``ef_construction`` build breadth,
    ``ef_search`` query breadth (recall/speed trade-off, settable after loading)."""

    name, exact = "hnsw", False

    def __init__(self, embeddings, m: int = 32, ef_construction: int = 200, ef_search: int = 64, index=None):
        faiss = _faiss()
        self.m, self.ef_construction = int(m), int(ef_construction)
        if index is None:
            index = faiss.IndexHNSWFlat(_rows(embeddings).shape[1], self.m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = self.ef_construction
        super().__init__(embeddings, index)
        self.set_ef_search(ef_search)

    def set_ef_search(self, ef_search: int) -> None:
        self.ef_search = int(ef_search)
        self.index.hnsw.efSearch = self.ef_search

    def params(self) -> Dict[str, Any]:
        return {"m": self.m, "ef_construction": self.ef_construction, "ef_search": self.ef_search}


@BACKENDS.register("ivf")
class FaissIVF(_FaissBackend):
    """faiss ``IndexIVFFlat`` (inner product, flat quantiser): ``nlist`` k-means cells (default
    ``4 sqrt(N)``), trained on the database itself; ``nprobe`` cells visited per query."""

    name, exact = "ivf", False

    def __init__(self, embeddings, nlist: Optional[int] = None, nprobe: int = 16, seed: int = 0, index=None):
        faiss = _faiss()
        if index is None:
            data = _rows(embeddings)
            self.nlist = int(nlist or max(1, min(len(data) // 39, round(4 * math.sqrt(len(data))))))
            quantizer = faiss.IndexFlatIP(data.shape[1])
            index = faiss.IndexIVFFlat(quantizer, data.shape[1], self.nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = int(seed)
            index.train(data)
            self._quantizer = quantizer  # the Python wrapper must outlive the index
        else:
            self.nlist = int(index.nlist)
        super().__init__(embeddings, index)
        self.set_nprobe(nprobe)

    def set_nprobe(self, nprobe: int) -> None:
        self.nprobe = int(nprobe)
        self.index.nprobe = self.nprobe

    def params(self) -> Dict[str, Any]:
        return {"nlist": self.nlist, "nprobe": self.nprobe}


BUILD_PARAMS = {"hnsw": ("m", "ef_construction"), "ivf": ("nlist",)}
QUERY_PARAMS = {"hnsw": ("ef_search",), "ivf": ("nprobe",), "torch": ("chunk",)}


def make_backend(name: str, embeddings, **params: Any) -> Backend:
    """A backend by name over ``embeddings`` (parameters not given keep their defaults; ``None`` ignored)."""
    if name == "exact":
        name = "flat" if faiss_available() else "torch"
    cls = BACKENDS.get_class(name)
    wanted = BUILD_PARAMS.get(name, ()) + QUERY_PARAMS.get(name, ())
    return cls(embeddings, **{k: v for k, v in params.items() if k in wanted and v is not None})


def _backend_file(directory: Path, name: str) -> Path:
    return Path(directory) / f"faiss-{name}.index"


def save_backend(index: DatabaseIndex, backend: Backend) -> Path:
    """Store an approximate structure beside the shards (atomic) and record its build parameters."""
    faiss = _faiss()
    path = _backend_file(index.directory, backend.name)
    atomic_write(path, lambda tmp: faiss.write_index(backend.index, tmp))
    index.manifest.setdefault("backends", {})[backend.name] = {
        "file": path.name, "params": {k: v for k, v in backend.params().items() if k in BUILD_PARAMS[backend.name]}}
    write_json(index.manifest, index.directory / MANIFEST)
    return path


def open_backend(index: DatabaseIndex, name: str = "exact", **params: Any) -> Backend:
    """The backend ``name`` over ``index``: an approximate one is read from the index folder when it was
    built there with the same build parameters (those not given here take the stored ones), else built now."""
    if name in BUILD_PARAMS:
        stored = index.manifest.get("backends", {}).get(name)
        requested = {k: params.get(k) for k in BUILD_PARAMS[name] if params.get(k) is not None}
        if stored and all(stored["params"].get(k) == v for k, v in requested.items()):
            path = index.directory / stored["file"]
            if path.is_file():
                loaded = _faiss().read_index(str(path))
                query = {k: params[k] for k in QUERY_PARAMS[name] if params.get(k) is not None}
                backend = BACKENDS.get_class(name)(None, index=loaded, **query)
                if name == "hnsw":
                    backend.m, backend.ef_construction = stored["params"]["m"], stored["params"]["ef_construction"]
                return backend
        print(f">> building the {name} structure in memory ({len(index)} vectors); "
              f"index.py --backend {name} stores it with the index", file=sys.stderr)
    return make_backend(name, index.embeddings, **params)


__all__ = ["BACKENDS", "Backend", "TorchExact", "FaissFlat", "FaissHNSW", "FaissIVF", "DatabaseIndex", "build_index",
           "load_index", "make_backend", "open_backend", "save_backend", "faiss_available", "items_hash"]
