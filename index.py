#!/usr/bin/env python
"""Embed a database with the teacher, at its resolution, into a resumable sharded index.

    python index.py --teacher-path runs/<run>/teacher/model_best.pth --index indexes/gallery photos/
    python index.py --teacher-path T.pth --index indexes/fm --dataset fashion-mnist-mini-test
    python index.py --teacher-path T.pth --index indexes/list --file-list gallery.txt --backend hnsw

Images: files and folders (recursively), ``--dataset NAME-test`` (a split subset) or ``--file-list``.
A killed run continues where it stopped when the same command runs again (complete shards are kept).
``--backend hnsw|ivf`` also builds and stores that approximate faiss structure (parameters below);
``search.py`` uses the exact backend unless told otherwise.
"""
from __future__ import annotations

import argparse
import time

import torch

from lib.models.loading import get_network
from lib.deploy.cli import add_backend_flags, add_image_flags, backend_params
from lib.deploy.index import BACKENDS, build_index, load_index, make_backend, save_backend
from lib.deploy.inputs import collect_images
from lib.models.pooling import POOLING
from lib.utils import run_script, select_device


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_image_flags(p, "the database")
    teacher = p.add_mutually_exclusive_group(required=True)
    teacher.add_argument("--teacher-path", "-tpath", metavar="CKPT", help="teacher checkpoint, file in pretrained/, or published name")
    teacher.add_argument("--teacher", "-t", metavar="ARCH", help="architecture used with its ImageNet weights as is")
    p.add_argument("--pool", default="gem", choices=sorted(POOLING), help="pooling for --teacher")
    p.add_argument("--whitening", default=0, type=int, help="whitening dimension for --teacher")
    p.add_argument("--weights", default=None, help="local ImageNet state dict for --teacher")
    p.add_argument("--index", required=True, help="index folder (created; an unfinished one is continued)")
    p.add_argument("--teacher-image-size", "-timsize", type=int, default=None, help="default: the teacher's training size")
    p.add_argument("--shard-size", type=int, default=4096, help="images per shard (the unit of resumption)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", "-j", type=int, default=0, help="data-loading workers")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--overwrite", action="store_true", help="replace an index of other content in --index")
    p.add_argument("--backend", default="exact", choices=["exact", *sorted(BACKENDS)],
                   help="also build and store this approximate structure (hnsw, ivf)")
    add_backend_flags(p)
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    images = collect_images(args.images, dataset=args.dataset, file_list=args.file_list, data_root=args.data_root,
                            val_ratio=args.val_ratio, flag="database images")
    device = select_device(args.device)
    teacher = get_network(args.teacher, args.teacher_path, pooling=args.pool, whitening=args.whitening,
                          weights=args.weights).to(device)
    size = args.teacher_image_size or teacher.meta.get("image_size")
    if not size:
        raise SystemExit("the teacher records no training image size: give --teacher-image-size")
    started = time.time()
    manifest = build_index(teacher, images, args.index, int(size), shard_size=args.shard_size, batch_size=args.batch_size,
                           workers=args.workers, device=device, overwrite=args.overwrite,
                           network_name=args.teacher_path or args.teacher)
    seconds = time.time() - started
    embedded = manifest.get("embedded_now", 0)
    print(f">> index {args.index}: {manifest['num_images']} images, {manifest['dim']}-d, teacher "
          f"{manifest['network']['architecture']} at {manifest['image_size']}px, fingerprint {manifest['fingerprint'][:12]}"
          + (f"; embedded {embedded} now in {seconds:.1f}s ({embedded / max(seconds, 1e-9):.0f} images/s, "
             f"{torch.get_num_threads()} threads)" if embedded else "; already complete"))
    if args.backend in ("hnsw", "ivf"):
        index = load_index(args.index)
        started = time.time()
        backend = make_backend(args.backend, index.embeddings, **backend_params(args))
        path = save_backend(index, backend)
        print(f">> {args.backend} structure {path} ({backend.params()}) built in {time.time() - started:.1f}s")
        manifest = index.manifest
    return manifest


if __name__ == "__main__":
    run_script(main, "index.py")
