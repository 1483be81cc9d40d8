"""The test of a student (and its teacher) on one dataset: the one evaluation that ``main.py``'s final
table and ``test.py`` both run.

Rows (settings), each ``(query side, database side)`` of the embeddings of the same test images:

=========  ================================  ========================================================
key        title in the printed table        query side -> database side
=========  ================================  ========================================================
teacher    ``teacher sym (T px)``            teacher@T -> teacher@T (the upper bound)
naive      ``naive asym (T@S -> T@T)``       teacher@S -> teacher@T (the baseline without training)
asym       ``student asym (S@S -> T@T)``     student@S -> teacher@T (the paper's asymmetric test)
sym        ``student sym (S px)``            student@S -> student@S
=========  ================================  ========================================================

``teacher``, ``naive`` and ``asym`` need a teacher; ``mAP/T`` and ``R@1/T`` divide by the ``teacher`` row.
The teacher's embeddings go through the embedding cache (``lib.extract.embedding_key``); the student's
are always computed. A dataset spec without a subset suffix means its test subset; ``-train``, ``-val``,
``-test`` ... name one explicitly (``lib.data.splits.parse_dataset_spec``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from lib.data.splits import load_split, parse_dataset_spec
from lib.evaluation.cost import add_query_cost
from lib.evaluation.protocol import add_teacher_ratio, evaluate_settings
from lib.extract import cached_extract, extract

#: the embedding keys: the student at the query size, the teacher at the database and at the query size
STUDENT, TEACHER, TEACHER_LOW = "student", "teacher", "teacher@low"
#: row key -> (query embedding, database embedding), in the order of the table
SETTINGS: Dict[str, Tuple[str, str]] = {
    "teacher": (TEACHER, TEACHER),
    "naive": (TEACHER_LOW, TEACHER),
    "asym": (STUDENT, TEACHER),
    "sym": (STUDENT, STUDENT),
}


def resolve_test_subset(spec: str) -> Tuple[str, str]:
    """``(dataset, subset)`` of a test dataset spec: a bare name means its test subset, an explicit suffix
    (``-train`` included) is kept."""
    name, subset = parse_dataset_spec(spec)
    if subset == "train" and not spec.strip().endswith("-train"):
        subset = "test"
    return name, subset


def subset_images(spec: str, data_root: str = "data", val_ratio: float = 0.5) -> Tuple[List[str], List[int]]:
    """``(paths, labels)`` of a test dataset spec (:func:`resolve_test_subset`)."""
    name, subset = resolve_test_subset(spec)
    return load_split(name, data_root, val_ratio=val_ratio).subset(subset)


def dataset_specs(datasets: str) -> List[str]:
    """The comma-separated dataset specs of ``--test-datasets`` / ``--datasets``."""
    return [d.strip() for d in datasets.split(",") if d.strip()]


def check_test_datasets(datasets: str, option: str, *, data_root: str = "data", val_ratio: float = 0.5) -> None:
    """Load every test dataset of ``datasets`` before anything trains or is tested: a misspelt name, a
    missing image or an absent subset is reported at once, naming ``option``, not after hours of training.
    An empty ``datasets`` is no test (``main.py --test-datasets ''``: no table)."""
    for spec in dataset_specs(datasets):
        try:
            subset_images(spec, data_root, val_ratio)
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(f"{option} {spec!r}: {e}") from None


def table_settings(*, teacher: bool, naive: bool = True, sym: bool = True) -> Dict[str, Tuple[str, str]]:
    """The rows to evaluate: with a teacher ``teacher``, ``naive`` (unless ``naive=False``), ``asym`` and
    (``sym``) ``sym``; without one, ``sym`` alone."""
    if not teacher:
        return {"sym": SETTINGS["sym"]}
    keys = ["teacher"] + (["naive"] if naive else []) + ["asym"] + (["sym"] if sym else [])
    return {k: SETTINGS[k] for k in keys}


def row_titles(image_size: int, teacher_size: Optional[int]) -> Dict[str, str]:
    """Row key -> the title printed in the table (sizes in pixels)."""
    s, t = image_size, teacher_size
    return {"teacher": f"teacher sym ({t}px)", "naive": f"naive asym (T@{s} -> T@{t})",
            "asym": f"student asym (S@{s} -> T@{t})", "sym": f"student sym ({s}px)"}


def embedding_sizes(image_size: int, teacher_size: Optional[int]) -> Dict[str, int]:
    return {STUDENT: image_size, TEACHER: teacher_size, TEACHER_LOW: image_size}


@dataclass
class DatasetEvaluation:
    """What one dataset's test produced: ``metrics`` by row key (``SETTINGS``), the embeddings by
    embedding key, and the images they came from."""

    spec: str
    paths: List[str]
    labels: Tensor
    embeddings: Dict[str, Tensor]
    settings: Dict[str, Tuple[str, str]]
    metrics: Dict[str, Dict[str, float]]
    sizes: Dict[str, int] = field(default_factory=dict)

    def rows(self) -> Dict[str, Dict[str, float]]:
        """``metrics`` under the printed titles (``row_titles``)."""
        titles = row_titles(self.sizes[STUDENT], self.sizes.get(TEACHER))
        return {titles[k]: v for k, v in self.metrics.items()}


def evaluate_dataset(spec: str, student, teacher=None, *, image_size: int, teacher_size: Optional[int] = None,
                     data_root: str = "data", val_ratio: float = 0.5, cache=None, device="cpu", batch_size: int = 64,
                     workers: int = 0, scales: Sequence[float] = (1.0,), amp: Optional[str] = None,
                     naive: bool = True, sym: bool = True, clustering: bool = False,
                     costs: Optional[Mapping[str, Mapping[str, float]]] = None) -> DatasetEvaluation:
    """Embed the test images of ``spec`` and evaluate the rows of :func:`table_settings`.

    ``costs``: query-side cost by embedding key (``lib.evaluation.cost.query_costs`` of
    ``{'student': (student, S), 'teacher': (teacher, T), 'teacher@low': (teacher, S)}``), added to each
    row. ``clustering``: NMI and F1 of k-means (``lib.evaluation.clustering``) on the rows whose query and
    database are one embedding (``teacher`` and ``sym``), of that embedding.
    """
    paths, labels = subset_images(spec, data_root, val_ratio)
    labels = torch.as_tensor(labels)
    common = dict(device=device, batch_size=batch_size, workers=workers, scales=scales, amp=amp)
    settings = table_settings(teacher=teacher is not None, naive=naive, sym=sym)
    embeddings = {STUDENT: extract(student, paths, image_size, progress=f"{spec} student@{image_size}", **common)}
    if teacher is not None:
        if not teacher_size:
            raise ValueError("a teacher needs its database image size (teacher_size)")
        teacher.to(device)
        embeddings[TEACHER] = cached_extract(cache, teacher, paths, teacher_size,
                                             progress=f"{spec} teacher@{teacher_size}", **common)
        if "naive" in settings:
            embeddings[TEACHER_LOW] = cached_extract(cache, teacher, paths, image_size,
                                                     progress=f"{spec} teacher@{image_size}", **common)
    metrics = add_teacher_ratio(evaluate_settings(embeddings, labels, settings, device=device),
                                "teacher" if teacher is not None else None)
    if clustering:
        from lib.evaluation.clustering import clustering_metrics

        for row, (query_key, db_key) in settings.items():
            if query_key == db_key:  # k-means clusters one embedding: the symmetric rows only
                metrics[row].update(clustering_metrics(embeddings[query_key], labels))
    if costs:
        add_query_cost(metrics, settings, costs)
    return DatasetEvaluation(spec, list(paths), labels, embeddings, settings, metrics,
                             embedding_sizes(image_size, teacher_size))


def cost_networks(student, teacher, image_size: int, teacher_size: Optional[int]) -> Dict[str, tuple]:
    """The ``{embedding key: (network, size)}`` whose query cost each row reports."""
    return {STUDENT: (student, image_size), TEACHER: (teacher, teacher_size), TEACHER_LOW: (teacher, image_size)}


__all__ = ["SETTINGS", "DatasetEvaluation", "evaluate_dataset", "resolve_test_subset", "table_settings", "row_titles",
           "cost_networks", "embedding_sizes"]
