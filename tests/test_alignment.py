"""Alignment figures (mean student-teacher cosine, self-R@1) against a plain loop, and in the protocol."""
import math

import torch
import torch.nn.functional as F

from lib.evaluation.alignment import alignment_metrics
from lib.evaluation.protocol import add_teacher_ratio, evaluate_settings, format_table


def _loop(query, db):
    cos, hits, ranks = [], 0, []
    for i in range(len(query)):
        sims = [float(query[i] @ db[j]) for j in range(len(db))]
        cos.append(sims[i])
        above = sum(s > sims[i] for s in sims)
        ties = sum(s == sims[i] for j, s in enumerate(sims) if j != i)
        hits += above == 0 and ties == 0
        ranks.append(above)
    return {"cos": sum(cos) / len(cos), "self-R@1": hits / len(query), "self-rank": sum(ranks) / len(ranks)}


def test_alignment_matches_loop_oracle_for_any_chunk():
    gen = torch.Generator().manual_seed(0)
    teacher = F.normalize(torch.randn(37, 8, generator=gen), dim=1)
    student = F.normalize(teacher + 0.6 * torch.randn(37, 8, generator=gen), dim=1)
    expected = _loop(student, teacher)
    for chunk in (1, 5, 37, None):
        got = alignment_metrics(student, teacher, chunk_size=chunk)
        for key, value in expected.items():
            assert math.isclose(got[key], value, rel_tol=1e-6, abs_tol=1e-6), (key, chunk)
    assert 0 < expected["self-R@1"] < 1  # the case is not trivial


def test_perfect_and_rotated_students():
    gen = torch.Generator().manual_seed(1)
    teacher = F.normalize(torch.randn(50, 16, generator=gen), dim=1)
    same = alignment_metrics(teacher, teacher)
    assert math.isclose(same["cos"], 1.0, rel_tol=1e-6) and same["self-R@1"] == 1.0 and same["self-rank"] == 0.0
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen))
    rotated = teacher @ rotation  # the same geometry (symmetric retrieval unchanged), another space
    far = alignment_metrics(rotated, teacher)
    assert far["cos"] < 0.5 and far["self-R@1"] < 0.5


def test_tied_duplicate_rows_are_not_a_self_hit():
    teacher = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), dim=1)
    got = alignment_metrics(teacher, teacher)
    assert got["self-R@1"] == 1 / 3


def test_protocol_reports_alignment_on_asymmetric_rows_and_teacher_ratio():
    gen = torch.Generator().manual_seed(2)
    labels = torch.arange(10).repeat_interleave(3)
    centers = F.normalize(torch.randn(10, 8, generator=gen), dim=1)
    teacher = F.normalize(centers[labels] + 0.3 * torch.randn(30, 8, generator=gen), dim=1)
    student = F.normalize(teacher + 0.3 * torch.randn(30, 8, generator=gen), dim=1)
    rows = evaluate_settings({"s": student, "t": teacher}, labels,
                             {"teacher sym": ("t", "t"), "asym": ("s", "t"), "sym": ("s", "s")})
    assert "cos" in rows["asym"] and "cos" not in rows["sym"] and "cos" not in rows["teacher sym"]
    add_teacher_ratio(rows, "teacher sym")
    assert rows["teacher sym"]["mAP/T"] == 1.0
    assert math.isclose(rows["asym"]["mAP/T"], rows["asym"]["mAP"] / rows["teacher sym"]["mAP"])
    table = format_table(rows, title="x")
    assert "mAP/T" in table.splitlines()[0] and "self-R@1" in table.splitlines()[0]
