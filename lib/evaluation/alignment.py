"""How well a query network lands in the database network's space, image by image.

Retrieval metrics mix two failures: a student whose features do not separate the classes, and a
student whose features separate them well but in a space rotated away from the teacher's. The second
shows as a high symmetric mAP next to a low asymmetric one; these figures name it directly. Row i of
``query`` and of ``db`` embed the same image (the student at the query size, the teacher at the
database size):

- ``cos``: mean cosine ``<q_i, d_i>`` (1 when the student reproduces the teacher);
- ``self-R@1``: share of images whose nearest database row is their own, ``argmax_j <q_i, d_j> == i``
  (ties counted as misses unless row i is the unique maximum), the retrieval of the image itself;
- ``self-rank``: mean 0-based rank of the own row among all database rows.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
from torch import Tensor


def alignment_metrics(query: Tensor, db: Tensor, *, chunk_size: Optional[int] = None) -> Dict[str, float]:
    """``{'cos', 'self-R@1', 'self-rank'}`` of paired rows (see the module docstring); O(chunk x N) memory."""
    if query.shape != db.shape or query.dim() != 2:
        raise ValueError(f"alignment needs paired (N, D) rows of the same images, got {tuple(query.shape)} "
                         f"and {tuple(db.shape)}")
    n = len(query)
    if n == 0:
        return {"cos": float("nan"), "self-R@1": float("nan"), "self-rank": float("nan")}
    chunk = chunk_size or max(1, min(n, (64 * 2**20) // max(1, 4 * n)))
    cos, hits, ranks = [], 0, []
    for start in range(0, n, chunk):
        q = query[start:start + chunk].float()
        sims = q @ db.float().T  # (c, N)
        rows = torch.arange(len(q), device=q.device)
        own = sims[rows, rows + start]
        cos.append(own.double())
        above = (sims > own.unsqueeze(1)).sum(1)
        ties = (sims == own.unsqueeze(1)).sum(1) - 1  # other rows scoring exactly the same
        hits += int(((above == 0) & (ties == 0)).sum())
        ranks.append(above.double())
    return {"cos": math.fsum(torch.cat(cos).tolist()) / n, "self-R@1": hits / n,
            "self-rank": math.fsum(torch.cat(ranks).tolist()) / n}


__all__ = ["alignment_metrics"]
