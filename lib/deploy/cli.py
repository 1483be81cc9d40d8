"""Command-line flags shared by index.py and search.py (parsing stays in the scripts)."""
from __future__ import annotations

import argparse


def add_backend_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("approximate search (faiss)")
    g.add_argument("--hnsw-m", type=int, default=None, help="HNSW links per node (default 32)")
    g.add_argument("--ef-construction", type=int, default=None, help="HNSW build breadth (default 200)")
    g.add_argument("--ef-search", type=int, default=None, help="HNSW query breadth (default 64)")
    g.add_argument("--nlist", type=int, default=None, help="IVF cells (default 4 sqrt(N))")
    g.add_argument("--nprobe", type=int, default=None, help="IVF cells visited per query (default 16)")


def backend_params(args) -> dict:
    return dict(m=args.hnsw_m, ef_construction=args.ef_construction, ef_search=args.ef_search, nlist=args.nlist,
                nprobe=args.nprobe)


def add_image_flags(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("images", nargs="*", help=f"{what}: image files and/or folders (searched recursively)")
    p.add_argument("--dataset", default=None, help=f"{what}: a dataset subset, NAME-test, NAME-val or NAME-train")
    p.add_argument("--file-list", default=None, help=f"{what}: a text file with one image path per line")
    p.add_argument("--data-root", default="data", help="folder holding the datasets (with --dataset)")
    p.add_argument("--val-ratio", default=0.5, type=float, help="validation share of the training classes (--dataset)")
