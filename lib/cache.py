"""On-disk cache of teacher (database) embeddings.

The key is a hash of everything the embeddings depend on (``lib.extract.embedding_key``): the
network's content (a hash of its tensors and of the metadata that defines its function), the image
list, the image size, the transform's description, the multi-scale setting and the autocast dtype. A second run with the same key reads the file; any change recomputes it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

from torch import Tensor

from lib.checkpoint import atomic_save, load_checkpoint
from lib.checkpoint import network_fingerprint  # the cache's key for a network: what it computes, not where it came from


def cache_key(**parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


class EmbeddingCache:
    """``get_or_compute(key_parts, compute)``; ``hits``/``misses`` count what happened."""

    def __init__(self, directory: Optional[str | Path]):
        self.directory = Path(directory) if directory else None
        self.hits = self.misses = 0

    def get_or_compute(self, parts: Dict[str, Any], compute: Callable[[], Tensor]) -> Tensor:
        if self.directory is None:
            self.misses += 1
            return compute()
        key = cache_key(**parts)
        path = self.directory / f"{key}.pt"
        if path.is_file():
            try:
                state = load_checkpoint(path)
                if state.get("parts") == json.loads(json.dumps(parts, default=str)):
                    self.hits += 1
                    return state["embeddings"]
            except ValueError:
                pass  # a corrupt cache file is recomputed and overwritten
        self.misses += 1
        embeddings = compute()
        atomic_save({"parts": json.loads(json.dumps(parts, default=str)), "embeddings": embeddings}, path)
        return embeddings


def paths_fingerprint(paths: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(paths).encode()).hexdigest()


__all__ = ["EmbeddingCache", "network_fingerprint", "cache_key", "paths_fingerprint"]
