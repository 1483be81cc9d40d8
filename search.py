#!/usr/bin/env python
"""Search an index (built by index.py with the teacher) with query images embedded by the student.

    python search.py --index indexes/gallery --student runs/<run>/model_best.pth query.jpg more_queries/
    python search.py --index indexes/gallery --student exported/student.onnx --dataset fashion-mnist-mini-test -k 5
    python search.py --index indexes/gallery --student S.pth queries/ --backend hnsw --ef-search 128 --output hits.json

Prints (or writes with ``--output``) JSON: for each query, its top-k database ids, paths and scores.
Refuses a student whose embedding space is not the index's: another dimension, or an index embedded by
a network other than the teacher recorded in the student's checkpoint or export (``--trust-pair``
overrides the latter only when the student records no teacher).
"""
from __future__ import annotations

import argparse
import sys
import time

from lib.deploy.cli import add_backend_flags, add_image_flags, backend_params
from lib.deploy.index import BACKENDS, load_index, open_backend
from lib.deploy.inputs import collect_images
from lib.deploy.search import PairMismatchError, check_pair, load_query_encoder, search_embeddings
from lib.utils import dumps_json, run_script, select_device, write_json


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_image_flags(p, "the queries")
    p.add_argument("--index", required=True, help="index folder written by index.py")
    p.add_argument("--student", "-s", required=True,
                   help="student checkpoint (model_best.pth), its ONNX export (.onnx) or TorchScript export")
    p.add_argument("-k", "--top-k", dest="k", type=int, default=10, help="results per query")
    p.add_argument("--image-size", type=int, default=None, help="query size; default: the student's training size")
    p.add_argument("--backend", default="exact", choices=["exact", *sorted(BACKENDS)],
                   help="exact: faiss IndexFlatIP (torch GEMM without faiss); hnsw, ivf: approximate")
    p.add_argument("--trust-pair", action="store_true",
                   help="search with a student that records no teacher fingerprint (never overrides a mismatch)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", "-j", type=int, default=0)
    p.add_argument("--device", default="auto", help="device of a PyTorch student")
    p.add_argument("--output", "-o", default=None, help="write the JSON here instead of printing it")
    add_backend_flags(p)
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.k < 1:
        raise SystemExit(f"-k must be positive, got {args.k}")
    index = load_index(args.index)
    encoder = load_query_encoder(args.student, image_size=args.image_size)
    try:
        pairing = check_pair(encoder, index, trust=args.trust_pair)
    except PairMismatchError as err:
        raise SystemExit(f"search.py: refused: {err}") from None
    queries = collect_images(args.images, dataset=args.dataset, file_list=args.file_list, data_root=args.data_root,
                             val_ratio=args.val_ratio, flag="query images")
    device = select_device(args.device)
    if encoder.net is not None:
        encoder.net.to(device)
    started = time.time()
    vectors = encoder.encode(queries.paths, batch_size=args.batch_size, workers=args.workers, device=device)
    embedded = time.time() - started
    backend = open_backend(index, args.backend, **backend_params(args))
    started = time.time()
    hits = search_embeddings(backend, vectors, index, args.k)
    searched = time.time() - started
    result = {
        "index": str(index.directory), "student": encoder.name, "student_kind": encoder.kind,
        "query_image_size": encoder.image_size, "database_image_size": index.manifest["image_size"],
        "pairing": pairing, "backend": backend.name, "backend_params": backend.params(), "k": args.k,
        "seconds": {"embed_queries": round(embedded, 4), "search": round(searched, 4)},
        "results": [{"query": qid, "path": path, "hits": h} for qid, path, h in zip(queries.ids, queries.paths, hits)],
    }
    if args.output:
        write_json(result, args.output)
        print(f">> {len(queries)} queries, top-{args.k} from {len(index)} images ({backend.name}, {pairing} pair): "
              f"{args.output}", file=sys.stderr)
    else:
        print(dumps_json(result))
    return result


if __name__ == "__main__":
    run_script(main, "search.py")
