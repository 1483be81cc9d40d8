"""Exact retrieval metrics from the ranks of the positives, computed in query chunks.

Protocol (cirtorch's ``compute_map``, as used by Suma & Tolias 2023): each query ranks the database
by similarity ``query @ db.T``; positives are the database items of the query's class; with
``exclude_self`` the query's own database item (same index) is junk: removed from the ranking.
Queries without a positive are left out of every average (and counted).

Every metric depends only on the 0-based ranks of the positives. With the positives' scores sorted
``p_0 >= p_1 >= ...``, the j-th positive's rank is ``j + #{negatives scoring >= p_j}``.

**Ties.** A negative whose score *equals* a positive's is ranked before it (pessimistic), so
degenerate embeddings (all equal) cannot score well; the order among tied positives is irrelevant.

No query x database matrix is ever held: each chunk of queries computes its similarities, finds the
positives' scores (the database is put in label order once, so a query's positives are one
contiguous slice), and counts the items above each positive with ``searchsorted`` against the
query's own sorted positive scores plus a per-row histogram: one pass over the chunk, no sort of the
database. Runs on the device of the inputs.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
from torch import Tensor


def _check(query: Tensor, db: Tensor, query_labels: Tensor, db_labels: Tensor, exclude_self: bool) -> None:
    if query.dim() != 2 or db.dim() != 2 or query.shape[1] != db.shape[1]:
        raise ValueError(f"query {tuple(query.shape)} and db {tuple(db.shape)} must be (N, D) with the same D")
    if query_labels.shape != (len(query),) or db_labels.shape != (len(db),):
        raise ValueError(f"labels {tuple(query_labels.shape)} / {tuple(db_labels.shape)} do not match "
                         f"{len(query)} queries / {len(db)} database items")
    if exclude_self and len(query) != len(db):
        raise ValueError(f"exclude_self needs query i to be database item i: {len(query)} queries, {len(db)} items")


def default_chunk_size(num_db: int, budget_bytes: int = 256 * 2**20) -> int:
    # per query row: the similarities (4 B), the bucket indices (8 B), and temporaries
    return max(1, min(4096, budget_bytes // (24 * max(num_db, 1))))


def positive_ranks(query: Tensor, db: Tensor, query_labels: Tensor, db_labels: Tensor, *, exclude_self: bool = False,
                   chunk_size: Optional[int] = None):
    """Yield ``(ranks, valid)`` per query chunk: ``ranks`` (c, P) 0-based ranks of each query's positives
    in increasing order, ``valid`` (c, P) marks real entries (P = the largest class size)."""
    _check(query, db, query_labels, db_labels, exclude_self)
    device = query.device
    db_labels = db_labels.to(device)
    query_labels = query_labels.to(device)
    # a common 0..C-1 coding of query and database labels
    classes, coded = torch.unique(torch.cat([db_labels, query_labels]), return_inverse=True)
    db_code, query_code = coded[: len(db)], coded[len(db):]
    order = torch.argsort(db_code, stable=True)
    db_sorted = db[order]
    counts = torch.bincount(db_code, minlength=len(classes))
    starts = torch.cumsum(counts, 0) - counts
    width = max(int(counts.max()) if len(counts) else 0, 1)
    position_in_sorted = torch.empty_like(order)
    position_in_sorted[order] = torch.arange(len(order), device=device)
    offsets = torch.arange(width, device=device)
    chunk_size = chunk_size or default_chunk_size(len(db))
    for begin in range(0, len(query), chunk_size):
        end = min(begin + chunk_size, len(query))
        sims = query[begin:end] @ db_sorted.T  # (c, Nd)
        rows = torch.arange(end - begin, device=device)
        code = query_code[begin:end]
        columns = starts[code].unsqueeze(1) + offsets  # (c, P) the query's positive slice
        valid = offsets.unsqueeze(0) < counts[code].unsqueeze(1)
        if exclude_self:
            self_col = position_in_sorted[begin:end]
            sims[rows, self_col] = float("-inf")  # junk: below every real score
            valid &= columns != self_col.unsqueeze(1)
        columns = columns.clamp(max=len(db) - 1)
        pos = sims.gather(1, columns).masked_fill(~valid, float("inf"))
        ascending, _ = pos.sort(dim=1)  # padding (+inf) last
        # bucket b of an item = how many (valid) positive scores are <= it; items at or above the
        # k-th smallest positive score are those with bucket > k
        buckets = torch.searchsorted(ascending, sims, right=True)  # (c, Nd) in 0..P
        hist = torch.zeros(end - begin, width + 1, dtype=torch.long, device=device)
        hist.scatter_add_(1, buckets, torch.ones_like(buckets))
        at_or_above = hist.flip(1).cumsum(1).flip(1)[:, 1:]  # (c, P): items >= ascending[:, k]
        valid_sorted = torch.isfinite(ascending)
        # positives at or above each positive score (ties included), then negatives = all - positives
        pos_at_or_above = ((ascending.unsqueeze(1) >= ascending.unsqueeze(2)) & valid_sorted.unsqueeze(1)).sum(2)
        negatives_above = at_or_above - pos_at_or_above
        num_valid = valid_sorted.sum(1, keepdim=True)
        # descending order of positives: j-th best positive is ascending index num_valid - 1 - j
        j = torch.arange(width, device=device).unsqueeze(0)
        idx = (num_valid - 1 - j).clamp(min=0)
        ranks = j + negatives_above.gather(1, idx)
        yield ranks, j < num_valid


def retrieval_metrics(query: Tensor, db: Tensor, query_labels: Tensor, db_labels: Tensor, *,
                      exclude_self: bool = False, ks: Sequence[int] = (1, 2, 4, 8),
                      chunk_size: Optional[int] = None) -> Dict[str, float]:
    """mAP (cirtorch's trapezoidal AP), mAP_noninterp, R@k (hit@k), mP@k and mAP@k (cirtorch), MAP@R.

    Values are fractions in [0, 1]; ``num_queries`` counts the queries averaged and
    ``num_queries_without_positives`` those left out.
    """
    query_labels, db_labels = torch.as_tensor(query_labels), torch.as_tensor(db_labels)
    totals = {"mAP": 0.0, "mAP_noninterp": 0.0, "MAP@R": 0.0}
    for k in ks:
        totals[f"R@{k}"] = totals[f"mP@{k}"] = totals[f"mAP@{k}"] = 0.0
    counted = skipped = 0
    for ranks, valid in positive_ranks(query.float(), db.float(), query_labels, db_labels,
                                       exclude_self=exclude_self, chunk_size=chunk_size):
        ranks, valid = ranks.double(), valid
        npos = valid.sum(1).double()
        keep = npos > 0
        skipped += int((~keep).sum())
        counted += int(keep.sum())
        ranks, valid, npos = ranks[keep], valid[keep], npos[keep]
        if not len(ranks):
            continue
        j = torch.arange(ranks.shape[1], device=ranks.device, dtype=torch.float64).unsqueeze(0)
        prec0 = torch.where(ranks == 0, torch.ones_like(ranks), j / ranks.clamp(min=1))
        prec1 = (j + 1) / (ranks + 1)
        trapezoid = ((prec0 + prec1) / 2).masked_fill(~valid, 0)
        totals["mAP"] += float((trapezoid.sum(1) / npos).sum())
        totals["mAP_noninterp"] += float((prec1.masked_fill(~valid, 0).sum(1) / npos).sum())
        within_r = valid & (ranks < npos.unsqueeze(1))
        totals["MAP@R"] += float((prec1.masked_fill(~within_r, 0).sum(1) / npos).sum())
        worst = (ranks + 1).masked_fill(~valid, 0).max(1).values  # 1-based rank of the last positive
        for k in ks:
            totals[f"R@{k}"] += float((ranks[:, 0] < k).sum())
            kq = worst.clamp(max=k)
            totals[f"mP@{k}"] += float((((ranks + 1) <= kq.unsqueeze(1)) & valid).sum(1).div(kq).sum())
            top = valid & (ranks <= k - 1)
            totals[f"mAP@{k}"] += float((trapezoid.masked_fill(~top, 0).sum(1) / npos.clamp(max=k)).sum())
    out = {name: value / counted if counted else float("nan") for name, value in totals.items()}
    out["num_queries"] = counted
    out["num_queries_without_positives"] = skipped
    return out


__all__ = ["retrieval_metrics", "positive_ranks", "default_chunk_size"]
