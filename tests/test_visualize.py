"""Pictures: the retrieval grid's geometry and frame colours, precision-recall against a loop oracle,
test.py --visualize, and the query-cost columns."""
import json

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import test as test_module
from lib.checkpoint import atomic_save, network_state
from lib.evaluation.cost import COST_COLUMNS, add_query_cost, count_flops, format_cost_table, query_cost
from lib.evaluation.visualize import (NEGATIVE, POSITIVE, QUERY, GridLayout, GridSetting, precision_recall,
                                      retrieval_grid, sample_queries, top_k)
from lib.models import build_network



def solid_images(tmp_path, colours):
    paths = []
    for i, colour in enumerate(colours):
        path = tmp_path / f"im{i}.png"
        Image.new("RGB", (20, 14), colour).save(path)
        paths.append(str(path))
    return paths


def test_grid_size_and_frame_colours(tmp_path):
    db_paths = solid_images(tmp_path, [(200, 200, 0), (0, 200, 200), (90, 90, 90), (10, 10, 10)])
    db_labels = [0, 1, 0, 1]
    query_paths, query_labels = db_paths[:2], [0, 1]
    asym = GridSetting("asym", torch.tensor([[0, 1, 2], [3, 2, 1]]), 8, 16)
    sym = GridSetting("sym", torch.tensor([[2, 3, 1], [1, 0, 3]]), 8, 8)
    image = retrieval_grid(query_paths, db_paths, query_labels, db_labels, [asym, sym], cell=24)
    layout = GridLayout(rows=2, k=3, blocks=2, cell=24)
    assert image.size == layout.size == (2 * 8 + 2 * (4 * 36 + 4) + 24, 2 * 8 + 18 + 2 * 36 - 4)
    pixels = np.asarray(image)

    def frame(row, block, column):
        x0, y0, x1, y1 = layout.box(row, block, column)
        return tuple(pixels[y0 + 1, x0 + 1]), tuple(pixels[y1 - 2, (x0 + x1) // 2]), tuple(pixels[(y0 + y1) // 2, x0 + 1])

    def inside(row, block, column):
        x0, y0, x1, y1 = layout.box(row, block, column)
        return tuple(pixels[(y0 + y1) // 2, (x0 + x1) // 2])

    expected = {  # (row, block): frame colour of each result, from the labels
        (0, 0): [POSITIVE, NEGATIVE, POSITIVE], (1, 0): [POSITIVE, NEGATIVE, POSITIVE],
        (0, 1): [POSITIVE, NEGATIVE, NEGATIVE], (1, 1): [POSITIVE, NEGATIVE, POSITIVE]}
    results = {0: asym.results, 1: sym.results}
    for (row, block), colours in expected.items():
        assert set(frame(row, block, 0)) == {QUERY}
        assert inside(row, block, 0) == Image.open(query_paths[row]).getpixel((10, 7))
        for column, colour in enumerate(colours, 1):
            assert set(frame(row, block, column)) == {colour}
            shown = Image.open(db_paths[int(results[block][row, column - 1])]).getpixel((10, 7))
            assert inside(row, block, column) == shown
    image.save(tmp_path / "grid.png")
    assert Image.open(tmp_path / "grid.png").size == layout.size


def test_top_k_excludes_self_and_sampling():
    x = F.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    _, rows = top_k(x, x, 5, exclude_self=True)
    assert rows.shape == (6, 5) and all(i not in r.tolist() for i, r in enumerate(rows))
    assert sample_queries(10, 3) == [0, 4, 9] and sample_queries(2, 5) == [0, 1]


def test_precision_recall_matches_a_loop():
    gen = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 3, (20,), generator=gen)
    x = F.normalize(torch.randn(20, 5, generator=gen), dim=1)
    recall, precision = precision_recall(x, x, labels, labels, exclude_self=True, levels=11)
    sims = (x @ x.T).fill_diagonal_(float("-inf"))
    expected, counted = np.zeros(11), 0
    for i in range(20):
        order = [j for j in torch.argsort(sims[i], descending=True).tolist() if j != i]
        relevant = [labels[j] == labels[i] for j in order]
        npos = sum(relevant)
        if not npos:
            continue
        counted += 1
        points, hits = [], 0
        for rank, rel in enumerate(relevant, 1):
            hits += bool(rel)
            if rel:
                points.append((hits / npos, hits / rank))
        for level_index, level in enumerate(np.linspace(0, 1, 11)):
            expected[level_index] += max(p for r, p in points if r >= level - 1e-12)
    assert torch.allclose(precision, torch.tensor(expected / counted, dtype=torch.float64), atol=1e-12)
    assert recall[0] == 0 and recall[-1] == 1


def test_cost_columns_and_student_cheaper_than_teacher():
    student = build_network("tf_efficientnet_lite0", "gem", 16, pretrained=False)
    teacher = build_network("tf_efficientnet_lite2", "gem", 16, pretrained=False)
    assert count_flops(student, 32) < count_flops(teacher, 32) < count_flops(teacher, 64)
    costs = {"s": query_cost(student, 32, repeats=3, warmup=1), "t": query_cost(teacher, 64, repeats=3, warmup=1)}
    assert costs["s"]["GFLOPs"] < costs["t"]["GFLOPs"] and costs["s"]["params"] < costs["t"]["params"]
    assert costs["s"]["threads"] == 1 and costs["s"]["ms"] > 0
    # the torch counter's convolution FLOPs equal the closed form for a single convolution
    conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert count_flops(conv, 10) == 2 * 8 * 3 * 9 * 10 * 10
    rows = add_query_cost({"teacher": {"mAP": 0.5}, "asym": {"mAP": 0.4}},
                          {"teacher": ("t", "t"), "asym": ("s", "t")}, costs)
    assert set(COST_COLUMNS) <= set(rows["asym"]) and rows["asym"]["q-GFLOPs"] == costs["s"]["GFLOPs"]
    table = format_cost_table(rows)
    assert all(c in table.splitlines()[0] for c in COST_COLUMNS)


def test_test_py_writes_pictures_and_cost(tmp_path, tiny_dataset):
    torch.manual_seed(0)
    student = build_network("resnet18", "gem", 16, pretrained=False, image_size=32)
    teacher = build_network("resnet18", "gem", 16, pretrained=False, image_size=48)
    atomic_save(network_state(student), tmp_path / "s.pth")
    atomic_save(network_state(teacher), tmp_path / "t.pth")
    out = test_module.main(["--student-path", str(tmp_path / "s.pth"), "--teacher-path", str(tmp_path / "t.pth"),
                            "--datasets", f"folder:{tiny_dataset}-test", "--workers", "0", "--cache-dir", "",
                            "--visualize", "3", "--visualize-k", "4", "--output", str(tmp_path / "r" / "res.json")])
    saved = json.loads((tmp_path / "r" / "res.json").read_text())
    rows = next(iter(saved["datasets"].values()))
    assert set(COST_COLUMNS) <= set(rows["asym"]) and set(COST_COLUMNS) <= set(rows["teacher"])
    assert rows["asym"]["q-GFLOPs"] < rows["teacher"]["q-GFLOPs"]  # 32 px queries against 48 px
    assert saved["cost"]["student"]["image_size"] == 32 and saved["cost"]["teacher"]["image_size"] == 48
    figures = next(iter(out["figures"].values()))
    names = sorted(p.split("/")[-1] for p in figures)
    assert names == ["res-images-test-grid.png", "res-images-test-pr-asym.png", "res-images-test-pr-naive.png",
                     "res-images-test-pr-sym.png", "res-images-test-pr-teacher.png"]
    grid = Image.open(tmp_path / "r" / "res-images-test-grid.png")
    assert grid.size == GridLayout(rows=3, k=4, blocks=2).size
