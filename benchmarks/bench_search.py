#!/usr/bin/env python
"""Indexing throughput and per-query search latency of a deployed pair, exact and approximate.

1. Index the largest dataset here (full Fashion-MNIST, 70,000 images, via ``load_split('fashion-mnist')``
   from Debian's ``dataset-fashion-mnist``; ``--limit N`` takes N of them spread over the classes) with
   the teacher at its resolution: images/s (resumable: a second run reuses the index and reports the
   figure stored by the run that embedded it).
2. One query at a time: the student's forward pass at its resolution on a preprocessed query, then the
   exact search (faiss ``IndexFlatIP`` and the toolkit's torch GEMM), timed per query (median, p90).
3. Approximate search alone (faiss HNSW over ``--ef-search`` values, IVF over ``--nprobe`` values), one
   query at a time: latency and recall@10 against the exact top-10.

``--synthetic``: the search part on ``--num`` random unit vectors of dimension ``--dim`` (no images, no
network; queries are random unit vectors too, the hardest case for an approximate index).

    python benchmarks/bench_search.py --teacher-path runs/<run>/teacher/model_best.pth \\
                                      --student-path runs/<run>/model_best.pth
    python benchmarks/bench_search.py --synthetic --num 70000 --dim 128
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lib.models.loading import get_network  # noqa: E402
from lib.data.datasets import load_image  # noqa: E402
from lib.data.splits import load_split  # noqa: E402
from lib.data.transforms import EvalTransform  # noqa: E402
from lib.deploy.index import build_index, load_index, make_backend  # noqa: E402
from lib.deploy.inputs import ImageSet  # noqa: E402
from lib.utils import write_json  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="fashion-mnist", help="dataset whose train+val+test images are indexed")
    p.add_argument("--data-root", default="data")
    p.add_argument("--limit", type=int, default=None, help="index only this many images (spread over the list)")
    p.add_argument("--teacher-path", default=None, help="teacher checkpoint (default: --teacher with ImageNet weights)")
    p.add_argument("--teacher", default="tf_efficientnet_lite2", help="teacher architecture when no --teacher-path")
    p.add_argument("--student-path", default=None, help="student checkpoint (default: --student with ImageNet weights)")
    p.add_argument("--student", default="tf_efficientnet_lite0", help="student architecture when no --student-path")
    p.add_argument("--whitening", type=int, default=128, help="embedding dimension of the --teacher/--student built here")
    p.add_argument("--teacher-image-size", type=int, default=None, help="default: the teacher's training size, else 64")
    p.add_argument("--image-size", type=int, default=None, help="query size; default: the student's training size, else 32")
    p.add_argument("--index-dir", default=".cache/bench-search", help="where the index is written (and reused)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--queries", type=int, default=500, help="queries timed one at a time")
    p.add_argument("--synthetic", action="store_true", help="random unit vectors instead of images for the search part")
    p.add_argument("--num", type=int, default=70000, help="--synthetic: database size")
    p.add_argument("--dim", type=int, default=128, help="--synthetic: dimension")
    p.add_argument("--threads", type=int, default=1, help="torch and faiss threads")
    p.add_argument("--ef-search", default="16,32,64,128", help="HNSW query breadths to try")
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--ef-construction", type=int, default=200)
    p.add_argument("--nprobe", default="8,16,32,64", help="IVF cells visited to try")
    p.add_argument("--nlist", type=int, default=None, help="IVF cells (default 4 sqrt(N))")
    p.add_argument("--output", default=None, help="also write the figures as JSON")
    return p.parse_args(argv)


def per_query_ms(fn, items):
    times = []
    for item in items:
        t0 = time.perf_counter()
        fn(item)
        times.append(1000 * (time.perf_counter() - t0))
    return {"median_ms": statistics.median(times), "p90_ms": float(np.percentile(times, 90)),
            "mean_ms": statistics.fmean(times)}


def recall_at(found: np.ndarray, exact: np.ndarray, k: int = 10) -> float:
    return float(np.mean([len(set(f[:k]) & set(e[:k])) / k for f, e in zip(found, exact)]))


def load_materialized(name: str, data_root: str):
    """``load_split``; for Fashion-MNIST whose split is cached in splits/ but whose PNGs are not written yet
    (a fresh clone), its builder writes them from the IDX files first (about a minute)."""
    try:
        return load_split(name, data_root)
    except FileNotFoundError:
        if name != "fashion-mnist":
            raise
        from lib.data.splits import build_fashion_mnist

        print(">> writing the Fashion-MNIST PNGs from the IDX files (once)")
        build_fashion_mnist(str(Path(data_root) / "fashion-mnist"), 0.5)
        return load_split(name, data_root)


def dataset_images(args) -> ImageSet:
    split = load_materialized(args.dataset, args.data_root)
    paths, labels = [], []
    for subset in ("train", "val", "test"):
        p, lab = split.subset(subset) if split.split.get(subset) else ([], [])
        offset = max(labels) + 1 if labels else 0
        paths += p
        labels += [v + offset for v in lab]
    if args.limit and args.limit < len(paths):
        keep = np.linspace(0, len(paths) - 1, args.limit).round().astype(int)
        paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
    root = str(Path(split.root).resolve())
    ids = [str(Path(p).resolve().relative_to(root)) if p.startswith(root) else p for p in paths]
    return ImageSet(paths, ids, labels, source={"kind": "dataset", "dataset": args.dataset, "subset": "all",
                                                "limit": args.limit})


def network(path, arch, whitening, seed):
    torch.manual_seed(seed)  # the whitening of an ImageNet network built here is random: fix it
    return get_network(arch, path, whitening=whitening).eval()


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    report = {"threads": args.threads, "torch": torch.__version__, "faiss": faiss.__version__}
    rng = np.random.default_rng(0)
    if args.synthetic:
        db = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((args.num, args.dim), dtype=np.float32)), dim=1)
        queries = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((args.queries, args.dim), dtype=np.float32)), dim=1)
        report["data"] = f"synthetic: {args.num} x {args.dim} random unit vectors, {args.queries} random unit queries"
        forward = None
    else:
        images = dataset_images(args)
        teacher = network(args.teacher_path, args.teacher, args.whitening, 0)
        student = network(args.student_path, args.student, args.whitening, 1)
        t_size = args.teacher_image_size or teacher.meta.get("image_size") or 64
        s_size = args.image_size or student.meta.get("image_size") or 32
        name = f"{args.dataset}-{len(images)}-{Path(args.teacher_path).parent.name if args.teacher_path else args.teacher}"
        manifest = build_index(teacher, images, Path(args.index_dir) / name, t_size, batch_size=args.batch_size,
                               workers=args.workers)
        index = load_index(Path(args.index_dir) / name)
        db = index.embeddings
        report["indexing"] = {"images": len(images), "embedded_in_this_run": manifest.get("embedded_now"),
                              "seconds": manifest.get("seconds"),
                              "images_per_s": manifest["embedded_now"] / manifest["seconds"] if manifest.get("seconds") else None,
                              "teacher": manifest["network"], "teacher_image_size": t_size, "dim": index.dim}
        print(f">> indexed {len(images)} images with {manifest['network']['architecture']} at {t_size}px: "
              f"{report['indexing']['images_per_s'] or float('nan'):.1f} images/s ({args.threads} thread(s))")
        chosen = rng.choice(len(images), size=min(args.queries, len(images)), replace=False)
        transform = EvalTransform(s_size, student.meta["mean"], student.meta["std"])
        t0 = time.perf_counter()
        tensors = [transform(load_image(images.paths[i])).unsqueeze(0) for i in chosen]
        report["query_preprocessing_ms"] = 1000 * (time.perf_counter() - t0) / len(tensors)
        with torch.no_grad():
            queries = torch.cat([student(t) for t in tensors])
        forward = (student, tensors, s_size)
        report["data"] = f"{args.dataset}: {len(images)} images (teacher {t_size}px, {index.dim}-d), {len(tensors)} " \
                         f"queries embedded by the student at {s_size}px"
    print(f">> {report['data']}; {args.threads} thread(s)")
    q = queries.numpy()
    exact_backends = {"flat": make_backend("flat", db), "torch": make_backend("torch", db)}
    _, exact_rows = exact_backends["flat"].search(q, 10)
    rows = []
    for name, backend in exact_backends.items():
        timing = per_query_ms(lambda v: backend.search(v[None], 10), q)
        rows.append({"backend": f"exact ({name})", "params": "", "recall@10": 1.0, **timing})
        if forward is not None:
            student, tensors, s_size = forward

            def forward_and_search(t):
                with torch.no_grad():
                    backend.search(student(t).numpy(), 10)

            timing = per_query_ms(forward_and_search, tensors)
            rows.append({"backend": f"exact ({name}) + student forward @{s_size}px", "params": "", "recall@10": 1.0, **timing})
    t0 = time.perf_counter()
    hnsw = make_backend("hnsw", db, m=args.hnsw_m, ef_construction=args.ef_construction)
    report["hnsw_build_s"] = time.perf_counter() - t0
    for ef in [int(v) for v in args.ef_search.split(",")]:
        hnsw.set_ef_search(ef)
        found = hnsw.search(q, 10)[1]
        rows.append({"backend": "hnsw", "params": f"M={args.hnsw_m} efC={args.ef_construction} efSearch={ef}",
                     "recall@10": recall_at(found, exact_rows), **per_query_ms(lambda v: hnsw.search(v[None], 10), q)})
    t0 = time.perf_counter()
    ivf = make_backend("ivf", db, nlist=args.nlist)
    report["ivf_build_s"] = time.perf_counter() - t0
    for nprobe in [int(v) for v in args.nprobe.split(",")]:
        ivf.set_nprobe(nprobe)
        found = ivf.search(q, 10)[1]
        rows.append({"backend": "ivf", "params": f"nlist={ivf.nlist} nprobe={nprobe}",
                     "recall@10": recall_at(found, exact_rows), **per_query_ms(lambda v: ivf.search(v[None], 10), q)})
    report["search"] = rows
    print(f"\n{'backend':<44}{'params':<34}{'recall@10':>10}{'median ms':>11}{'p90 ms':>9}")
    for r in rows:
        print(f"{r['backend']:<44}{r['params']:<34}{r['recall@10']:>10.4f}{r['median_ms']:>11.3f}{r['p90_ms']:>9.3f}")
    print(f">> build: HNSW {report['hnsw_build_s']:.1f}s, IVF {report['ivf_build_s']:.1f}s"
          + (f"; query preprocessing {report['query_preprocessing_ms']:.2f} ms/image (decode, resize, crop)"
             if "query_preprocessing_ms" in report else ""))
    with_forward = [r for r in rows if "forward" in r["backend"]]
    if with_forward:
        best = min(r["median_ms"] for r in with_forward)
        print(f">> target exact incl. forward < 20 ms/query: {best:.2f} ms ({'met' if best < 20 else 'missed'})")
    good = [r for r in rows if r["backend"] in ("hnsw", "ivf") and r["recall@10"] >= 0.95]
    if good:
        fastest = min(good, key=lambda r: r["median_ms"])
        print(f">> target approximate recall@10 >= 0.95 under 2 ms: {fastest['backend']} {fastest['params']}: "
              f"recall {fastest['recall@10']:.4f}, {fastest['median_ms']:.3f} ms ({'met' if fastest['median_ms'] < 2 else 'missed'})")
    else:
        print(">> target approximate recall@10 >= 0.95: no setting reached it; raise --ef-search / --nprobe")
    if args.output:
        write_json(report, args.output)
    return report


if __name__ == "__main__":
    main()
