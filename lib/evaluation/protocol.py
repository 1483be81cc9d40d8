"""The paper's test protocol on top of the metrics: which embeddings query which.

Every test image queries all other test images (itself excluded by index); positives share its
class. A *setting* names the query side and the database side, e.g. ``asym = (student@224,
teacher@448)``, ``sym = (student@224, student@224)``.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Tuple

from torch import Tensor

from lib.evaluation.alignment import alignment_metrics
from lib.evaluation.metrics import retrieval_metrics

#: alignment columns, present for settings whose query and database sides are different embeddings
ALIGNMENT_COLUMNS = ("cos", "self-R@1")


def evaluate_settings(embeddings: Mapping[str, Tensor], labels: Tensor,
                      settings: Mapping[str, Tuple[str, str]], *, ks: Sequence[int] = (1, 2, 4, 8),
                      chunk_size: Optional[int] = None, device=None) -> Dict[str, Dict[str, float]]:
    """``{setting: metrics}`` for each ``setting: (query key, database key)`` of ``embeddings``.

    A setting whose two sides are different embeddings of the same images (asymmetric) also gets the
    alignment figures of :mod:`lib.evaluation.alignment` (``cos``, ``self-R@1``, ``self-rank``).
    """
    results = {}
    for name, (query_key, db_key) in settings.items():
        query, db = embeddings[query_key], embeddings[db_key]
        if device is not None:
            query, db = query.to(device), db.to(device)
        lab = labels.to(query.device)
        results[name] = retrieval_metrics(query, db, lab, lab, exclude_self=True, ks=ks, chunk_size=chunk_size)
        if results[name]["num_queries"] == 0:
            raise ValueError(f"setting {name!r}: none of the {len(lab)} queries has a positive (every class holds a "
                             "single image), so no retrieval metric is defined; give the test set classes of two "
                             "images or more")
        if query_key != db_key:
            results[name].update(alignment_metrics(query, db, chunk_size=chunk_size))
    return results


def add_teacher_ratio(results: Dict[str, Dict[str, float]], reference: Optional[str]) -> Dict[str, Dict[str, float]]:
    """Add ``mAP/T`` and ``R@1/T`` (each row's mAP and R@1 as a share of row ``reference``'s, the teacher's
    symmetric test) to every row; nothing when ``reference`` is None or absent."""
    if reference is None or reference not in results:
        return results
    ref = results[reference]
    for metrics in results.values():
        for key in ("mAP", "R@1"):
            if key in metrics and ref.get(key):
                metrics[f"{key}/T"] = metrics[key] / ref[key]
    return results


def format_table(rows: Mapping[str, Mapping[str, float]],
                 columns: Sequence[str] = ("mAP", "R@1", "R@2", "R@4", "R@8", "mP@4", "MAP@R", "mAP/T", "R@1/T",
                                           *ALIGNMENT_COLUMNS),
                 title: str = "") -> str:
    """A fixed-width table of percentages, one row per setting (``mAP/T``: % of the teacher's symmetric mAP;
    ``cos``: mean student-teacher cosine of the same image; ``self-R@1``: % of images whose nearest
    database row is their own), and a last line saying how many queries had no positive, if any."""
    present = [c for c in columns if any(c in r for r in rows.values())]
    width = max([len(title)] + [len(k) for k in rows]) + 2
    cell = {c: max(8, len(c) + 1) for c in present}
    lines = [title.ljust(width) + "".join(c.rjust(cell[c]) for c in present)]
    for name, metrics in rows.items():
        cells = "".join((f"{100 * metrics[c]:.2f}" if c in metrics else "-").rjust(cell[c]) for c in present)
        lines.append(name.ljust(width) + cells)
    without = max((int(r.get("num_queries_without_positives") or 0) for r in rows.values()), default=0)
    if without:
        total = max(int(r.get("num_queries", 0)) + int(r.get("num_queries_without_positives", 0)) for r in rows.values())
        lines.append(f"{without} of {total} queries have no positive (the only image of their class): "
                     "left out of every average above")
    return "\n".join(lines)


__all__ = ["ALIGNMENT_COLUMNS", "add_teacher_ratio", "evaluate_settings", "format_table"]
