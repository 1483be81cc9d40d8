"""Exact retrieval metrics from the ranks of the positives, computed in query chunks.

Protocol (cirtorch's ``compute_map``, as used by Suma & Tolias, WACV 2023): each query ranks the
database by the similarity ``query @ db.T`` (higher = closer); its positives are the database items
with its label; with ``exclude_self`` the query's own database item (same index: the same image,
possibly embedded by another network) is junk, i.e. removed from the ranking. Queries without a
positive are left out of every average and counted in ``num_queries_without_positives``.

Every metric depends only on the 0-based ranks of the positives. With a query's positive scores
sorted ``p_0 >= p_1 >= ...``, the j-th positive's rank is ``j + #{negatives scoring >= p_j}``.

**Tie rule.** A negative whose score *equals* a positive's score is ranked before that positive
(pessimistic), so degenerate embeddings (all equal) cannot score well; the order among tied
positives does not change any metric.

**Chunk independence.** Every similarity is computed once, and by the same product whatever
``chunk_size`` is (a BLAS rounds a 1-row product differently from a 256-row one, which could flip
near-ties): a query's similarities to the items of its own class by one GEMM per class, those to
every other item by the GEMM of an aligned block of ``GEMM_ROWS`` query rows against a fixed block
of database columns (``tile_columns``); ``chunk_size`` (rounded up to a multiple of ``GEMM_ROWS``)
only sets how many queries are yielded at once. The counting is exact integer work, so the ranks,
hence the metrics, do not depend on ``chunk_size``.

Algorithm (no query x database matrix, no sort of the database, no Python loop per query): the
database is put in label order once, so a query's class is one contiguous slice of it. First, the
positives' scores: for each class, its queries against its slice, one small GEMM (a Python loop
over classes). Then per block of ``GEMM_ROWS`` queries, the positive scores sorted (c, P), P = the
largest class, and per block of database columns: the similarities (c, tile), the query's own class
set to -inf there (those items are positives or junk, never negatives), and each remaining item's
bucket (= how many positive scores are <= it) by a batched ``searchsorted`` against its row's
sorted positive scores; a per-row histogram of the buckets, accumulated over the column blocks and
summed from the top, counts the negatives at or above each positive score. Items below a row's lowest
positive score have bucket 0 and count for nothing: when a sample of the block says they are most
of it (any embedding worth evaluating), only the others are located (``nonzero``) and bucketed,
each against its row's positives, or, when that copy would be large (large classes), by one search
over all rows' positives keyed (row, score). On the CPU a column block (256 x 4096 floats, 4 MB) is
counted while the GEMM has just left it in the cache; with (256, Nd) blocks (62 MB at SOP size) the
bare GEMM alone took 1.4-1.7x as long at N = 60,502 (1.1x at N <= 20,000; 2 threads,
benchmarks/bench_eval.py) and the counting another pass through memory. Cost: the GEMM, one
comparison pass over each block, and O(M log P) for the M items above the lowest positives (O(Nd log P) per query
otherwise); memory: the (Nq, P) positive scores and a few bytes per similarity of one block. Runs on
the device of the inputs (one column block on an accelerator), in float32.
"""
from __future__ import annotations

import math
from typing import Dict, Iterator, Optional, Sequence, Tuple

import torch
from torch import Tensor

GEMM_ROWS = 256  # query rows per similarity GEMM, aligned to the query index
SPARSE_SHARE = 0.125  # bucket only the items at or above the lowest positive when they are fewer than this
# sparse path: items x P up to which each item searches a copy of its row's positives (4 MB); above it one
# keyed search, which costs the same with SOP-like classes (P = 12) and 1.4-2.4x less than a larger copy
# with CUB-like ones (P = 60; per-chunk timings at N = 5,924, one thread)
ROW_SEARCH_LIMIT = 2**20
# database columns per similarity block on the CPU (256 x 4096 float32: 4 MB, counted while in the cache)
CPU_TILE_COLUMNS = 4096
CHUNK_ROWS = 4 * GEMM_ROWS  # queries whose ranks are yielded at once by default


def tile_columns(num_db: int, device: torch.device) -> int:
    """Database columns per similarity block: on the CPU ``CPU_TILE_COLUMNS``, so that the block is
    counted while the GEMM has just left it in the cache (a (256, Nd) block at SOP size is 62 MB and
    costs another pass through memory); on an accelerator the whole database, one large GEMM."""
    return CPU_TILE_COLUMNS if device.type == "cpu" else max(num_db, 1)


def _check(query: Tensor, db: Tensor, query_labels: Tensor, db_labels: Tensor, exclude_self: bool) -> None:
    if query.dim() != 2 or db.dim() != 2 or query.shape[1] != db.shape[1]:
        raise ValueError(f"query {tuple(query.shape)} and db {tuple(db.shape)} must be (N, D) with the same D")
    if len(query) == 0 or len(db) == 0:
        raise ValueError(f"empty query ({len(query)} rows) or db ({len(db)} rows)")
    if query_labels.shape != (len(query),) or db_labels.shape != (len(db),):
        raise ValueError(f"labels: query_labels {tuple(query_labels.shape)} and db_labels {tuple(db_labels.shape)} "
                         f"must be ({len(query)},) and ({len(db)},), one per query / database row")
    if query_labels.is_floating_point() or db_labels.is_floating_point() or query_labels.is_complex():
        raise ValueError(f"labels must be integers, got {query_labels.dtype} / {db_labels.dtype}")
    if exclude_self and len(query) != len(db):
        raise ValueError(f"exclude_self needs query i to be database item i: {len(query)} queries, {len(db)} items")


def _row_score_keys(rows: Tensor, scores: Tensor) -> Tensor:
    """int64 keys ordered as (row, score): the float32 bits made monotone (IEEE order as integers;
    -0.0 first turned into +0.0, which it equals), shifted to be non-negative, below the row."""
    bits = (scores.float() + 0.0).contiguous().view(torch.int32)
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long() + 2**31
    return rows.long() * 2**32 + bits


def _positive_keys(ascending: Tensor) -> Tensor:
    """Every row's positive scores keyed (row, score), one ascending 1-D sequence (for ``_add_buckets``)."""
    c, width = ascending.shape
    return _row_score_keys(torch.arange(c, device=ascending.device).repeat_interleave(width), ascending.reshape(-1))


def _add_buckets(sims: Tensor, ascending: Tensor, hist: Tensor, keys: Optional[Tensor] = None) -> None:
    """Add each item's bucket (the number of its row's positive scores <= it) to ``hist``, (c * (P + 1),)
    per-row histograms; ``keys``: ``_positive_keys(ascending)``, when the caller has it.

    Items below a row's lowest positive score fall in bucket 0 and count for nothing, so when they
    are most of the row (any useful embedding), only the others are bucketed (sparse path)."""
    c, width = ascending.shape
    lowest = ascending[:, :1]
    stride = max(1, sims.shape[1] // 256)  # a cheap estimate of the share of items to bucket
    if bool((sims[:, ::stride] >= lowest).float().mean() < SPARSE_SHARE):
        rows, cols = torch.where(sims >= lowest)
        if len(rows) * width <= ROW_SEARCH_LIMIT:  # each item searches its row's positives (a (items x P) copy)
            buckets = torch.searchsorted(ascending[rows], sims[rows, cols].unsqueeze(1), right=True).squeeze(1)
        else:  # large classes: one 1-D search over all rows' positives keyed (row, score), no copy
            found = torch.searchsorted(_positive_keys(ascending) if keys is None else keys,
                                       _row_score_keys(rows, sims[rows, cols]), right=True)
            buckets = found - rows * width  # the positives of the earlier rows come first
        hist.index_add_(0, rows * (width + 1) + buckets, torch.ones_like(buckets))
    else:
        buckets = torch.searchsorted(ascending, sims, right=True)  # (c, Nd) in 0..P
        buckets += torch.arange(c, device=sims.device).unsqueeze(1) * (width + 1)
        hist.index_add_(0, buckets.view(-1), torch.ones(1, dtype=torch.long, device=sims.device).expand(buckets.numel()))


def _from_the_top(hist: Tensor, c: int, width: int) -> Tensor:
    """(c, P) from the bucket histograms: #items at or above each positive score."""
    return hist.view(c, width + 1).flip(1).cumsum(1).flip(1)[:, 1:]


def _at_or_above(sims: Tensor, ascending: Tensor) -> Tensor:
    """(c, P): #items with score >= ``ascending[:, k]`` (each row's positive scores ascending, +inf padding).

    An item's bucket is the number of positive scores <= it; a histogram of the buckets summed from
    the top gives the counts (ties: an item equal to a positive score counts as at or above it)."""
    c, width = ascending.shape
    hist = torch.zeros(c * (width + 1), dtype=torch.long, device=sims.device)
    _add_buckets(sims, ascending, hist)
    return _from_the_top(hist, c, width)


def _positive_scores(query: Tensor, query_code: Tensor, db_sorted: Tensor, starts: Tensor, counts: Tensor,
                     width: int) -> Tensor:
    """(Nq, P): each query's similarity to the items of its class (the label-sorted database's slice
    ``starts[code] + k``, k < ``counts[code]``; padding 0), one GEMM per class that has queries: the
    same values whatever ``chunk_size`` is. A Python loop over classes (tenths of a second for SOP's
    11,316 test classes), which costs less than gathering each query's class rows per chunk."""
    order = torch.argsort(query_code, stable=True)
    query_sorted = query[order]
    classes, per_class = torch.unique_consecutive(query_code[order], return_counts=True)
    sorted_scores = query.new_zeros(len(query), width)
    first = 0
    for n, begin, size in zip(per_class.tolist(), starts[classes].tolist(), counts[classes].tolist()):
        sorted_scores[first:first + n, :size] = query_sorted[first:first + n] @ db_sorted[begin:begin + size].T
        first += n
    scores = torch.empty_like(sorted_scores)
    scores[order] = sorted_scores
    return scores


def _block_ranks(query: Tensor, scores: Tensor, db_sorted: Tensor, columns: Tensor, members: Tensor, valid: Tensor,
                 tile: int) -> Tuple[Tensor, Tensor]:
    """(c, P) ranks of the positives of at most ``GEMM_ROWS`` queries, best first (padding: junk).

    ``columns`` (c, P): each query's class slice of the label-sorted database, ``members`` the real
    entries of it (the padding is never read), ``valid`` those that are positives (``members`` less
    the query itself when it is junk), ``scores`` their similarities (:func:`_positive_scores`). Every
    other database item is a negative, scored once by the (c, tile) GEMM of its block of columns and
    counted there at or above each positive score."""
    ascending = scores.masked_fill(~valid, float("inf")).sort(dim=1).values  # padding (+inf) last
    num_real = torch.isfinite(ascending).sum(1, keepdim=True)
    # the class's own items (row, column), by column, and where each block of columns begins among them
    own_columns, by_column = columns[members].sort(stable=True)
    own_rows = members.nonzero()[:, 0][by_column]
    bounds = torch.searchsorted(own_columns, torch.arange(0, len(db_sorted) + tile, tile, device=columns.device))
    c, width = columns.shape
    hist = torch.zeros(c * (width + 1), dtype=torch.long, device=columns.device)
    keys = _positive_keys(ascending)  # once per block, for the blocks of columns that search by key
    for t, first, last in zip(range(0, len(db_sorted), tile), bounds.tolist(), bounds[1:].tolist()):
        sims = query @ db_sorted[t:t + tile].T
        sims[own_rows[first:last], own_columns[first:last] - t] = float("-inf")  # not negatives: never counted
        _add_buckets(sims, ascending, hist, keys)
    negatives_above = _from_the_top(hist, c, width)
    j = torch.arange(width, device=columns.device).unsqueeze(0)
    # the j-th best positive sits at ascending index num_real - 1 - j
    return j + negatives_above.gather(1, (num_real - 1 - j).clamp(min=0)), j < num_real


def positive_ranks(query: Tensor, db: Tensor, query_labels: Tensor, db_labels: Tensor, *, exclude_self: bool = False,
                   chunk_size: Optional[int] = None) -> Iterator[Tuple[Tensor, Tensor]]:
    """Yield ``(ranks, valid)`` per chunk of queries, in query order: ``ranks`` (c, P) int64 holds the
    0-based ranks of each query's positives in increasing order, ``valid`` (c, P) marks the real
    entries (P = the largest database class). Tie rule and protocol: see the module docstring."""
    query_labels, db_labels = torch.as_tensor(query_labels), torch.as_tensor(db_labels)
    _check(query, db, query_labels, db_labels, exclude_self)
    device = query.device
    query, db = query.float(), db.to(device).float()
    db_labels, query_labels = db_labels.to(device).long(), query_labels.to(device).long()
    # one 0..C-1 coding for query and database labels; the database in label order
    classes, coded = torch.unique(torch.cat([db_labels, query_labels]), return_inverse=True)
    db_code, query_code = coded[: len(db)], coded[len(db):]
    order = torch.argsort(db_code, stable=True)
    db_sorted = db[order].contiguous()
    counts = torch.bincount(db_code, minlength=len(classes))
    starts = torch.cumsum(counts, 0) - counts
    width = max(int(counts.max()) if len(counts) else 0, 1)
    position_in_sorted = torch.empty_like(order)
    position_in_sorted[order] = torch.arange(len(order), device=device)
    offsets = torch.arange(width, device=device)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    chunk = -(-(chunk_size or CHUNK_ROWS) // GEMM_ROWS) * GEMM_ROWS
    tile = tile_columns(len(db), device)
    scores = _positive_scores(query, query_code, db_sorted, starts, counts, width)
    for begin in range(0, len(query), chunk):
        parts = []
        for s in range(begin, min(begin + chunk, len(query)), GEMM_ROWS):  # blocks aligned to the query index
            e = min(s + GEMM_ROWS, len(query))
            code = query_code[s:e]
            columns = starts[code].unsqueeze(1) + offsets  # (c, P) the query's class slice
            members = offsets.unsqueeze(0) < counts[code].unsqueeze(1)
            valid = members & (columns != position_in_sorted[s:e].unsqueeze(1)) if exclude_self else members
            parts.append(_block_ranks(query[s:e], scores[s:e], db_sorted, columns, members, valid, tile))
        yield torch.cat([r for r, _ in parts]), torch.cat([v for _, v in parts])


def retrieval_metrics(query: Tensor, db: Tensor, query_labels: Tensor, db_labels: Tensor, *,
                      exclude_self: bool = False, ks: Sequence[int] = (1, 2, 4, 8),
                      chunk_size: Optional[int] = None) -> Dict[str, float]:
    """Exact retrieval metrics of ``query`` (Nq, D) against ``db`` (Nd, D), fractions in [0, 1].

    - ``mAP``: cirtorch's ``compute_ap`` (trapezoids of the precision-recall curve): for the j-th
      positive at rank r, ``((1 if r == 0 else j / r) + (j + 1) / (r + 1)) / 2`` summed over
      positives, divided by their number; the paper's (Suma & Tolias 2023) mAP;
    - ``mAP_noninterp``: the usual non-interpolated AP, mean over positives of ``(j + 1) / (r + 1)``;
    - ``R@k``: hit@k, 1 if any positive is in the top k (the "Recall@k" of DML papers);
    - ``mP@k``, ``mAP@k``: cirtorch's mean precision at k (``kq = min(last positive's 1-based rank,
      k)``, precision = #positives within kq / kq) and AP over the positives ranked below k,
      normalised by ``min(#positives, k)``;
    - ``MAP@R``: Musgrave et al., "A Metric Learning Reality Check", ECCV 2020, Sec. 3.2:
      R = #positives, ``sum over positives ranked < R of precision at that rank, / R``;
    - ``num_queries`` (averaged), ``num_queries_without_positives`` (skipped).

    ``exclude_self``: query i is database item i (same image, possibly another network or
    resolution); that item is junk for query i. Memory: O(Nq x P) for the positives' scores and one
    block of similarities; see the module docstring.
    """
    names = ["mAP", "mAP_noninterp", "MAP@R"] + [f"{m}@{k}" for k in ks for m in ("R", "mP", "mAP")]
    if any(int(k) != k or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {tuple(ks)}")
    per_query = {name: [] for name in names}  # summed exactly at the end: independent of chunk_size
    counted = skipped = 0
    for ranks, valid in positive_ranks(query, db, query_labels, db_labels,
                                       exclude_self=exclude_self, chunk_size=chunk_size):
        npos = valid.sum(1)
        keep = npos > 0
        skipped += int((~keep).sum())
        counted += int(keep.sum())
        ranks, valid, npos = ranks[keep].double(), valid[keep], npos[keep].double()
        if not len(ranks):
            continue
        j = torch.arange(ranks.shape[1], device=ranks.device, dtype=torch.float64).unsqueeze(0)
        precision_0 = torch.where(ranks == 0, torch.ones_like(ranks), j / ranks.clamp(min=1))
        precision_1 = (j + 1) / (ranks + 1)
        trapezoid = ((precision_0 + precision_1) / 2).masked_fill(~valid, 0)
        per_query["mAP"].append(trapezoid.sum(1) / npos)
        per_query["mAP_noninterp"].append(precision_1.masked_fill(~valid, 0).sum(1) / npos)
        within_r = valid & (ranks < npos.unsqueeze(1))
        per_query["MAP@R"].append(precision_1.masked_fill(~within_r, 0).sum(1) / npos)
        last = (ranks + 1).masked_fill(~valid, 0).max(1).values  # 1-based rank of the last positive
        for k in ks:
            per_query[f"R@{k}"].append((ranks[:, 0] < k).double())
            kq = last.clamp(max=k)
            per_query[f"mP@{k}"].append((((ranks + 1) <= kq.unsqueeze(1)) & valid).sum(1) / kq)
            top = valid & (ranks <= k - 1)
            per_query[f"mAP@{k}"].append(trapezoid.masked_fill(~top, 0).sum(1) / npos.clamp(max=k))
    out: Dict[str, float] = {name: math.fsum(torch.cat(values).tolist()) / counted if counted else float("nan")
                             for name, values in per_query.items()}
    out["num_queries"] = counted
    out["num_queries_without_positives"] = skipped
    return out


__all__ = ["retrieval_metrics", "positive_ranks", "tile_columns", "GEMM_ROWS", "CHUNK_ROWS"]
