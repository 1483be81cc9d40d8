"""Pictures of what a model retrieves: a grid of sample queries with their top-k database images
(positives framed green, negatives red), one block per setting side by side, and precision-recall
curves.

Every image is shown as the network saw it: loaded, resized and centre-cropped by the evaluation
transform's rule at the resolution of its side (the student's queries at the query size, the database
at the size its embedder used), then enlarged with nearest-neighbour sampling to a common cell size, so
a 32 px query looks like 32 px. The grid's geometry is :class:`GridLayout` (tests read frame colours
at its boxes). Files are written atomically; matplotlib runs on the Agg backend.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from PIL import Image, ImageDraw
from torch import Tensor

from lib.data.datasets import load_image
from lib.evaluation.metrics import positive_ranks
from lib.utils import atomic_write

POSITIVE = (0, 170, 0)
NEGATIVE = (220, 20, 20)
QUERY = (40, 90, 200)
BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)


@dataclass(frozen=True)
class GridLayout:
    """Rows of queries; per setting a block of ``1 + k`` framed slots (the query, then its results)."""

    rows: int
    k: int
    blocks: int
    cell: int = 64      # thumbnail side in pixels
    border: int = 4     # frame thickness
    pad: int = 4        # space between slots
    gap: int = 24       # space between setting blocks
    header: int = 18    # title line above the blocks
    margin: int = 8

    @property
    def slot(self) -> int:
        return self.cell + 2 * self.border

    @property
    def block_width(self) -> int:
        return (self.k + 1) * (self.slot + self.pad) + self.pad  # an extra pad after the query

    @property
    def size(self) -> Tuple[int, int]:
        width = 2 * self.margin + self.blocks * self.block_width + (self.blocks - 1) * self.gap
        height = 2 * self.margin + self.header + self.rows * (self.slot + self.pad) - self.pad
        return width, height

    def block_x(self, block: int) -> int:
        return self.margin + block * (self.block_width + self.gap)

    def box(self, row: int, block: int, column: int) -> Tuple[int, int, int, int]:
        """(left, top, right, bottom), right/bottom exclusive, of a framed slot: column 0 is the query,
        1..k its results."""
        x = self.block_x(block) + column * (self.slot + self.pad) + (self.pad if column else 0)
        y = self.margin + self.header + row * (self.slot + self.pad)
        return x, y, x + self.slot, y + self.slot


def thumbnail(path: str, image_size: int, cell: int) -> Image.Image:
    """The image as a network at ``image_size`` sees it (eval transform's resize and crop, no
    normalisation), enlarged to ``cell`` with nearest-neighbour sampling."""
    from torchvision.transforms import functional as TF

    image = load_image(path)
    image = TF.resize(image, round(image_size * 8 / 7), interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    image = TF.center_crop(image, [image_size, image_size])
    return image.resize((cell, cell), Image.NEAREST)


@torch.no_grad()
def top_k(query: Tensor, db: Tensor, k: int, exclude_self: bool = False, query_index: Optional[Tensor] = None
          ) -> Tuple[Tensor, Tensor]:
    """(scores, rows) of the ``k`` most similar database rows of each query (inner product); with
    ``exclude_self``, query row i (or ``query_index[i]``) is database row i, left out as in the protocol."""
    sims = query.float() @ db.float().T
    if exclude_self:
        own = query_index if query_index is not None else torch.arange(len(query))
        sims[torch.arange(len(query)), own] = float("-inf")
    top = sims.topk(min(k, sims.shape[1] - int(exclude_self)), dim=1)
    return top.values, top.indices


def sample_queries(num_images: int, count: int) -> List[int]:
    """``count`` query indices spread evenly over the list (deterministic; class-ordered lists give
    queries of many classes)."""
    count = min(count, num_images)
    if count <= 0:
        return []
    return sorted({round(i * (num_images - 1) / max(count - 1, 1)) for i in range(count)})


@dataclass
class GridSetting:
    """One block: its title, the result rows (len(queries), k) and the sizes each side was embedded at."""

    name: str
    results: Tensor
    query_size: int
    db_size: int


def retrieval_grid(query_paths: Sequence[str], db_paths: Sequence[str], query_labels: Sequence[int],
                   db_labels: Sequence[int], settings: Sequence[GridSetting], *, cell: int = 64) -> Image.Image:
    """The grid PNG's image: one row per query (``query_paths[i]``), one block per setting, framed slots:
    the query in blue, each result green (same label) or red."""
    if not settings:
        raise ValueError("no setting to draw")
    k = max(int(s.results.shape[1]) for s in settings)
    layout = GridLayout(rows=len(query_paths), k=k, blocks=len(settings), cell=cell)
    canvas = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    cache: Dict[Tuple[str, int], Image.Image] = {}

    def tile(path: str, size: int) -> Image.Image:
        if (path, size) not in cache:
            cache[(path, size)] = thumbnail(path, size, cell)
        return cache[(path, size)]

    for b, setting in enumerate(settings):
        draw.text((layout.block_x(b), layout.margin), f"{setting.name}: queries {setting.query_size}px, "
                  f"database {setting.db_size}px", fill=TEXT)
        for r, (path, label) in enumerate(zip(query_paths, query_labels)):
            boxes = [(layout.box(r, b, 0), QUERY, path, setting.query_size)]
            for c, row in enumerate(setting.results[r].tolist(), 1):
                colour = POSITIVE if int(db_labels[row]) == int(label) else NEGATIVE
                boxes.append((layout.box(r, b, c), colour, db_paths[row], setting.db_size))
            for (x0, y0, x1, y1), colour, image_path, size in boxes:
                draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=colour)
                canvas.paste(tile(image_path, size), (x0 + layout.border, y0 + layout.border))
    return canvas


def retrieval_figure(embeddings: Mapping[str, Tensor], labels: Sequence[int], paths: Sequence[str],
                     settings: Mapping[str, Tuple[str, str]], sizes: Mapping[str, int], *, num_queries: int = 8,
                     k: int = 5, cell: int = 64) -> Image.Image:
    """The grid for the protocol's test (every image queries all others): ``settings`` name ->
    (query key, database key) of ``embeddings``, ``sizes`` key -> the resolution that embedding saw."""
    chosen = sample_queries(len(paths), num_queries)
    index = torch.as_tensor(chosen, dtype=torch.long)
    blocks = []
    for name, (query_key, db_key) in settings.items():
        _, rows = top_k(embeddings[query_key][index], embeddings[db_key], k, exclude_self=True, query_index=index)
        blocks.append(GridSetting(name, rows, sizes[query_key], sizes[db_key]))
    labels = [int(v) for v in torch.as_tensor(labels).tolist()]
    return retrieval_grid([paths[i] for i in chosen], paths, [labels[i] for i in chosen], labels, blocks, cell=cell)


@torch.no_grad()
def precision_recall(query: Tensor, db: Tensor, query_labels: Tensor, db_labels: Tensor, *,
                     exclude_self: bool = False, levels: int = 101) -> Tuple[Tensor, Tensor]:
    """(recall levels 0..1, mean interpolated precision at each): for each query, the precision at
    recall R is the best precision at any recall >= R (the positives' ranks from the exact protocol of
    :mod:`lib.evaluation.metrics`), averaged over queries with a positive."""
    recall = torch.linspace(0, 1, levels, dtype=torch.float64)
    total, counted = torch.zeros(levels, dtype=torch.float64), 0
    for ranks, valid in positive_ranks(query, db, query_labels, db_labels, exclude_self=exclude_self):
        ranks, valid = ranks.cpu(), valid.cpu()
        npos = valid.sum(1)
        keep = npos > 0
        ranks, valid, npos = ranks[keep].double(), valid[keep], npos[keep].double()
        if not len(ranks):
            continue
        j = torch.arange(ranks.shape[1], dtype=torch.float64).unsqueeze(0)
        precision = ((j + 1) / (ranks + 1)).masked_fill(~valid, 0)
        best_after = precision.flip(1).cummax(1).values.flip(1)  # best precision at this positive or later
        first = (torch.ceil(recall.unsqueeze(0) * npos.unsqueeze(1) - 1e-9) - 1).clamp(min=0).long()
        total += best_after.gather(1, first).sum(0)
        counted += len(ranks)
    return recall, total / max(counted, 1)


def save_image(image: Image.Image, path: str | os.PathLike) -> Path:
    path = Path(path)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"), suffix=".png")
    return path


def plot_precision_recall(curves: Mapping[str, Tuple[Tensor, Tensor]], path: str | os.PathLike, *,
                          title: str = "") -> Path:
    """A PNG of one or more precision-recall curves (``name -> (recall, precision)``)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.5, 4), dpi=100)
    axes = figure.add_subplot()
    for name, (recall, precision) in curves.items():
        axes.plot(recall.numpy(), precision.numpy(), label=name)
    axes.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="interpolated precision", title=title)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower left", fontsize=8)
    figure.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"), suffix=".png")
    return path


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text).strip("_")


def write_figures(prefix: str | os.PathLike, embeddings: Mapping[str, Tensor], labels: Tensor, paths: Sequence[str],
                  grid_settings: Mapping[str, Tuple[str, str]], curve_settings: Mapping[str, Tuple[str, str]],
                  sizes: Mapping[str, int], *, num_queries: int = 8, k: int = 5,
                  metrics: Optional[Mapping[str, Mapping[str, float]]] = None) -> List[str]:
    """``<prefix>-grid.png`` (``grid_settings`` side by side) and ``<prefix>-pr-<setting>.png`` per
    ``curve_settings`` entry; returns the paths written."""
    prefix = Path(prefix)
    written = [save_image(retrieval_figure(embeddings, labels, paths, grid_settings, sizes, num_queries=num_queries, k=k),
                          prefix.with_name(f"{prefix.name}-grid.png"))]
    labels = torch.as_tensor(labels)
    for name, (query_key, db_key) in curve_settings.items():
        curve = precision_recall(embeddings[query_key], embeddings[db_key], labels, labels, exclude_self=True)
        score = metrics.get(name, {}).get("mAP") if metrics else None
        label = f"{name} ({query_key}@{sizes[query_key]} -> {db_key}@{sizes[db_key]})"
        label += f", mAP {100 * score:.2f}" if score is not None and not math.isnan(score) else ""
        written.append(plot_precision_recall({label: curve}, prefix.with_name(f"{prefix.name}-pr-{_slug(name)}.png"),
                                             title=f"{prefix.name}: {name}"))
    return [str(p) for p in written]


__all__ = ["GridLayout", "GridSetting", "POSITIVE", "NEGATIVE", "QUERY", "retrieval_grid", "retrieval_figure", "top_k",
           "sample_queries", "precision_recall", "plot_precision_recall", "save_image", "write_figures", "thumbnail"]
