#!/usr/bin/env python
"""Evaluate a student (query side) alone (symmetric) or against a teacher (asymmetric).

    python test.py --student-path runs/default/student/model_best.pth \
                   --teacher-path runs/default/teacher/model_best.pth \
                   --datasets cjk-glyphs-mini-test --image-size 32 --teacher-image-size 64 --sym

Every test image queries all other test images; the student embeds the queries at --image-size, the
teacher embeds the database at --teacher-image-size (asymmetric), or the student embeds both
(symmetric, --sym or when no teacher is given). With a teacher the table also has the teacher's own
row and the naive asymmetric baseline (the teacher on --image-size queries): the rows and the code of
main.py's final table (``lib.evaluation.run``); the JSON keeps the rows under their keys ``teacher``,
``naive``, ``asym``, ``sym``. Teacher embeddings are cached on disk (``lib.extract.embedding_key``).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


from lib.cache import EmbeddingCache
from lib.models.loading import get_network
from lib.evaluation.cost import cost_summary, format_cost_table, query_costs
from lib.evaluation.protocol import format_table
from lib.evaluation.run import check_test_datasets, cost_networks, dataset_specs, evaluate_dataset
from lib.models.pooling import POOLING
from lib.utils import parse_scales, run_script, select_device, write_json


def _bounded(kind, low: float, high: float | None = None, high_open: bool = False):
    """An argparse type: ``kind`` (int or float) in [low, high] (or [low, high)); argparse names the flag."""
    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if value < low or (high is not None and (value > high or (high_open and value == high))):
            bound = f">= {low}" + (f" and {'<' if high_open else '<='} {high}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    convert.__name__ = kind.__name__
    return convert


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Asymmetric image retrieval testing", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    student = p.add_mutually_exclusive_group(required=True)
    student.add_argument("--student", "-s", metavar="ARCH", help="architecture (ImageNet weights) for the query side")
    student.add_argument("--student-path", "-spath", metavar="CKPT", help="student checkpoint, file in pretrained/, or published name")
    teacher = p.add_mutually_exclusive_group()
    teacher.add_argument("--teacher", "-t", metavar="ARCH", help="architecture (ImageNet weights) for the database side")
    teacher.add_argument("--teacher-path", "-tpath", metavar="CKPT", help="teacher checkpoint, file in pretrained/, or published name")
    p.add_argument("--pool", "-p", default="gem", choices=sorted(POOLING), help="pooling for --student/--teacher")
    p.add_argument("--whitening", "-w", default=0, type=_bounded(int, 0), help="whitening dimension for --student/--teacher (0: none)")
    p.add_argument("--not-pretrained", dest="pretrained", action="store_false", help="random weights for --student/--teacher")
    p.add_argument("--weights", default=None, help="local ImageNet state dict for --student/--teacher")
    p.add_argument("--datasets", "-d", default="cjk-glyphs-mini-test", help="comma-separated datasets (name[-test|-val])")
    p.add_argument("--data-root", default="data", help="folder holding the datasets")
    p.add_argument("--image-size", "-imsize", default=None, type=_bounded(int, 1), help="query (student) size; default: the student's training size")
    p.add_argument("--teacher-image-size", "-timsize", default=None, type=_bounded(int, 1), help="database (teacher) size; default: the teacher's training size")
    p.add_argument("--sym", action="store_true", help="also run the symmetric test (student on both sides)")
    p.add_argument("--multiscale", "-ms", default="[1]", help="scales, e.g. '[1, 1/2**(1/2), 1/2]'")
    p.add_argument("--workers", "-j", default=4, type=_bounded(int, 0), help="data-loading workers")
    p.add_argument("--batch-size", default=64, type=_bounded(int, 1), help="extraction batch size")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"], help="autocast for extraction on CUDA")
    p.add_argument("--cache-dir", default=".cache/embeddings", help="teacher embedding cache ('' disables)")
    p.add_argument("--val-ratio", default=0.5, type=_bounded(float, 0.0, 1.0, high_open=True), help="validation share of training classes (for -val datasets)")
    p.add_argument("--clustering", action="store_true", help="also report NMI and F1 of k-means on the symmetric rows (teacher, sym), each of its own embeddings")
    p.add_argument("--output", default=None, help="results JSON (default: test_results.json beside the student checkpoint, else in .)")
    p.add_argument("--visualize", default=0, type=_bounded(int, 0), metavar="N",
                   help="write a grid PNG of N sample queries with their top results (asym and sym side by side) "
                        "and a precision-recall PNG per setting, next to the JSON")
    p.add_argument("--visualize-k", default=5, type=_bounded(int, 1), help="results per query in the grid")
    p.add_argument("--cost-threads", default=1, type=_bounded(int, 1), help="CPU threads for the query-cost latency (batch 1)")
    p.add_argument("--no-cost", dest="cost", action="store_false", help="skip the query-cost columns")
    return p


def resolve_size(explicit, net, fallback: int, flag: str) -> int:
    size = explicit or net.meta.get("image_size") or fallback
    if not explicit and not net.meta.get("image_size"):
        print(f">> {flag} not given and the network records no training size: using {fallback}", file=sys.stderr)
    return int(size)


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        scales = parse_scales(args.multiscale)
    except ValueError as err:
        parser.error(str(err))
    check_test_datasets(args.datasets, "--datasets", data_root=args.data_root, val_ratio=args.val_ratio)
    device = select_device(args.device)
    build = dict(pooling=args.pool, whitening=args.whitening, pretrained=args.pretrained, weights=args.weights)
    student = get_network(args.student, args.student_path, **build).to(device)
    teacher = None
    if args.teacher or args.teacher_path:
        teacher = get_network(args.teacher, args.teacher_path, **build).to(device)
    image_size = resolve_size(args.image_size, student, 224, "--image-size")
    teacher_size = resolve_size(args.teacher_image_size, teacher, 448, "--teacher-image-size") if teacher else None
    cache = EmbeddingCache(args.cache_dir or None)

    results = {"student": student.meta.get("checkpoint", args.student), "image_size": image_size,
               "teacher": (teacher.meta.get("checkpoint", args.teacher) if teacher else None),
               "teacher_image_size": teacher_size, "multiscale": scales, "datasets": {}}
    output = args.output or (Path(args.student_path).parent / "test_results.json"
                             if args.student_path and Path(args.student_path).is_file() else "test_results.json")
    costs = query_costs(cost_networks(student, teacher, image_size, teacher_size),
                        threads=args.cost_threads) if args.cost else {}
    if costs:
        results["cost"] = costs
    for spec in dataset_specs(args.datasets):
        start = time.time()
        evaluation = evaluate_dataset(
            spec, student, teacher, image_size=image_size, teacher_size=teacher_size, data_root=args.data_root,
            val_ratio=args.val_ratio, cache=cache, device=device, batch_size=args.batch_size, workers=args.workers,
            scales=scales, amp=args.amp, sym=teacher is None or args.sym, clustering=args.clustering, costs=costs)
        metrics = evaluation.metrics  # by row key: teacher, naive, asym, sym (lib.evaluation.run.SETTINGS)
        results["datasets"][spec] = metrics
        print(format_table(evaluation.rows(), title=spec))
        if costs:
            print(format_cost_table(evaluation.rows(), title=f"query-side cost ({args.cost_threads} thread CPU, batch 1)"))
        if args.visualize > 0:
            from lib.evaluation.visualize import write_figures

            embeddings = evaluation.embeddings
            grid = {k: v for k, v in (("asym", ("student", "teacher")), ("sym", ("student", "student"))) if v[1] in embeddings}
            figures = write_figures(Path(output).with_name(f"{Path(output).stem}-{Path(spec).name}"), embeddings,
                                    evaluation.labels, evaluation.paths, grid, {**evaluation.settings, **grid},
                                    evaluation.sizes, num_queries=args.visualize, k=args.visualize_k, metrics=metrics)
            results.setdefault("figures", {})[spec] = figures
            print(f">> pictures: {', '.join(figures)}")
        print(f">> {spec}: {len(evaluation.paths)} images, {time.time() - start:.1f}s"
              + (f", teacher cache {'hit' if cache.hits else 'miss'}" if teacher is not None else ""))
        cache.hits = cache.misses = 0
    if "student" in costs and "teacher" in costs:
        print(">> " + cost_summary(costs["student"], costs["teacher"]))
    write_json(results, output)
    print(f">> results written to {output}")
    return results


if __name__ == "__main__":
    run_script(main, "test.py")
