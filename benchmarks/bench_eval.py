#!/usr/bin/env python
"""Time and peak memory of exact retrieval evaluation: ours against the bare GEMM and the reference.

Synthetic unit-norm (N, 512) float32 embeddings with class structure (class centroid + noise), class
sizes CUB-like (about 60 per class) or SOP-like (2..12, mean about 5). Every measurement runs in a
fresh subprocess, so the peak RSS (``ru_maxrss``, which includes the interpreter, torch and the
embeddings) belongs to one method only. The methods are interleaved (gemm, ours, gemm, ours, ...) and
each figure is the median of ``--repeats`` (3) runs, so a load change on a shared host hits both alike:

- ``gemm``: every similarity ``query @ db.T`` once, in the blocks ``retrieval_metrics`` computes
  them (``GEMM_ROWS`` queries x ``tile_columns`` database columns), results discarded: the floor for
  any exact method that computes them;
- ``rows``: the same similarities by one (256, N) GEMM per 256 queries, the previous floor (and the
  previous block of ``retrieval_metrics``), for comparison: on the CPU its 62 MB blocks at SOP size
  leave the cache and the GEMM itself is slower;
- ``ours``: ``retrieval_metrics(x, x, labels, labels, exclude_self=True)``;
- ``reference``: the reference's algorithm re-implemented (``test.py:find_ranks``: full N x N
  ``torch.mm`` and an ``argsort`` over the database axis; ``lib/utils/evaluate.py:compute_map``: a
  Python loop per query with ``isin`` and trapezoidal ``compute_ap``, the query as junk), run only
  where its N x N similarity + int64 ranks (12 N^2 bytes) fit in ``--reference-limit-gb``. Its mAP and
  R@1 must equal ours within 1e-6.

    python benchmarks/bench_eval.py                          # 5924 and 60502; CUB and SOP classes
    python benchmarks/bench_eval.py --sizes 2000 --profiles sop --threads 1
    python benchmarks/bench_eval.py --device cuda            # peak memory = torch.cuda.max_memory_allocated

Targets (issue 13), checked in the last column: ours / gemm <= 1.1 with SOP-like classes and <= 1.2
with CUB-like classes at N >= 60502, <= 1.4 below; peak RSS < 1.5 GB at N = 60502 (CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lib.evaluation import metrics  # noqa: E402
from lib.evaluation.metrics import GEMM_ROWS, retrieval_metrics, tile_columns  # noqa: E402

DIM = 512


def make_data(n: int, profile: str, seed: int = 0, noise: float = 0.1):
    """Unit-norm embeddings: random unit centroid per class + Gaussian noise (per coordinate), rows shuffled.

    ``noise`` 0.1 gives mAP about 0.6-0.7 at N = 5000 (SOP-like), the range of trained embeddings."""
    rng = np.random.default_rng(seed)
    if profile == "cub":
        sizes = np.full(max(1, round(n / 60)), 0)
        sizes += n // len(sizes)
        sizes[: n - sizes.sum()] += 1
    elif profile == "sop":
        sizes = []
        while sum(sizes) < n:
            sizes.append(2 + int(rng.binomial(10, 0.3)))  # 2..12, mean 5
        sizes[-1] -= sum(sizes) - n
        sizes = np.array([s for s in sizes if s > 0])
    else:
        raise ValueError(f"unknown profile {profile!r}: cub, sop")
    labels = np.repeat(np.arange(len(sizes)), sizes)
    rng.shuffle(labels)
    g = torch.Generator().manual_seed(seed)
    centroids = torch.nn.functional.normalize(torch.randn(len(sizes), DIM, generator=g), dim=1)
    x = centroids[torch.from_numpy(labels)]
    x += noise * torch.randn(n, DIM, generator=g)
    x = torch.nn.functional.normalize(x, dim=1)
    return x.contiguous(), torch.from_numpy(labels)


# ---------------------------------------------------------------------------------------------
# the three methods
# ---------------------------------------------------------------------------------------------

CHUNKS = 0  # > 0: only the first CHUNKS blocks of GEMM_ROWS queries (``--chunks``), for every method alike


def _query_blocks(n: int):
    return range(0, min(n, CHUNKS * GEMM_ROWS) if CHUNKS else n, GEMM_ROWS)


def run_gemm(x, labels):
    tile = tile_columns(len(x), x.device)
    for begin in _query_blocks(len(x)):
        for t in range(0, len(x), tile):
            sims = x[begin:begin + GEMM_ROWS] @ x[t:t + tile].T
            del sims
    _sync(x.device)
    return {}


def run_rows(x, labels):
    for begin in _query_blocks(len(x)):
        sims = x[begin:begin + GEMM_ROWS] @ x.T
        del sims
    _sync(x.device)
    return {}


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_ours(x, labels):
    out = retrieval_metrics(x, x, labels, labels, exclude_self=True, ks=(1, 4, 8))
    return {"mAP": out["mAP"], "R@1": out["R@1"]}


def reference_compute_ap(ranks, nres):
    ap = 0.0
    for j, rank in enumerate(ranks):
        precision_0 = 1.0 if rank == 0 else j / rank
        precision_1 = (j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) / nres / 2
    return ap


def run_reference(x, labels):
    """The reference's protocol: D x N columns, full similarity, argsort per query column, per-query loop."""
    labels_np = labels.numpy()
    members = {}
    for i, c in enumerate(labels_np.tolist()):
        members.setdefault(c, []).append(i)
    gnd = [{"ok": [m for m in members[c] if m != i], "junk": [i]} for i, c in enumerate(labels_np.tolist())]
    vecs = x.T  # the reference holds D x N
    scores = torch.mm(vecs.T, vecs)
    ranks = torch.argsort(scores, descending=True, dim=0).numpy()
    del scores
    kappas = [1, 4, 8]
    total_ap, empty = 0.0, 0
    recall = np.zeros(len(kappas))
    for i in range(len(gnd)):
        ok, junk = np.array(gnd[i]["ok"]), np.array(gnd[i]["junk"])
        if ok.shape[0] == 0:
            empty += 1
            continue
        pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], ok)]
        junk_pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], junk)]
        k = ij = 0
        for ip in range(len(pos)):  # shift positives up by the junk ranked before them
            while ij < len(junk_pos) and pos[ip] > junk_pos[ij]:
                k += 1
                ij += 1
            pos[ip] -= k
        total_ap += reference_compute_ap(pos, len(ok))
        for j, kappa in enumerate(kappas):
            recall[j] += (pos <= kappa - 1).any()
    counted = len(gnd) - empty
    return {"mAP": total_ap / counted, "R@1": recall[0] / counted}


METHODS = {"gemm": run_gemm, "rows": run_rows, "ours": run_ours, "reference": run_reference}


def worker(method: str, n: int, profile: str, noise: float, device: str, chunks: int = 0) -> None:
    global CHUNKS
    CHUNKS = chunks
    if chunks:  # this process only: retrieval_metrics sees the first `chunks` blocks of queries
        import itertools

        full = metrics.positive_ranks
        metrics.positive_ranks = lambda *a, **k: itertools.islice(full(*a, **{**k, "chunk_size": GEMM_ROWS}), chunks)
    device = torch.device(device)
    if method == "reference" and device.type != "cpu":
        raise ValueError("the reference runs on the CPU only (its loop is numpy)")
    x, labels = make_data(n, profile, noise=noise)
    x, labels = x.to(device), labels.to(device)
    if device.type == "cuda":  # one untimed warm-up (CUDA context, cuBLAS handles), then a clean peak
        METHODS[method](x[:512], labels[:512])
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = METHODS[method](x, labels)
    _sync(device)
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak_gb = torch.cuda.max_memory_allocated(device) / 1e9
    else:
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: kilobytes
    print(json.dumps({"seconds": seconds, "peak_gb": peak_gb, "classes": int(labels.max()) + 1, **result}))


def measure(method: str, n: int, profile: str, noise: float, device: str = "cpu", threads: int = 0,
            chunks: int = 0) -> dict:
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    done = subprocess.run([sys.executable, __file__, "--worker", method, str(n), profile, "--noise", str(noise),
                           "--device", device, "--chunks", str(chunks)], capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"{method} N={n} {profile} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:  # pragma: no cover
        return "n/a"


def target(n: int, profile: str) -> float:
    """The issue's ceiling on ours / gemm."""
    if n < 60502:
        return 1.4
    return 1.1 if profile == "sop" else 1.2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="5924,20000,60502", help="comma-separated N")
    parser.add_argument("--profiles", default="cub,sop", help="class-size profiles: cub (~60/class), sop (2..12)")
    parser.add_argument("--noise", type=float, default=0.1, help="per-coordinate noise around the class centroids")
    parser.add_argument("--reference-limit-gb", type=float, default=12.0,
                        help="run the reference only where 12 N^2 bytes fit in this")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per method; the median is printed")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in each run (0: torch's default)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the reference always runs on the CPU)")
    parser.add_argument("--chunks", type=int, default=0,
                        help="time only the first CHUNKS blocks of 256 queries against the whole database, "
                             "for gemm and ours alike (a shared CPU: the per-chunk work is the same throughout); "
                             "0: all queries. mAP / R@1 are then those of these queries, the reference is skipped, "
                             "and ours still scores the positives of all queries (one GEMM per class, a full run's "
                             "share), which overstates it")
    parser.add_argument("--worker", nargs=3, metavar=("METHOD", "N", "PROFILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args.worker[2], args.noise, args.device, args.chunks)
        return
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {device.type} ({where}), D={DIM}, float32; median of {args.repeats} "
          f"interleaved runs; times in s, peak memory in GB "
          f"({'torch.cuda.max_memory_allocated' if device.type == 'cuda' else 'RSS of the whole process'}); "
          f"load average at start {load_average()}", flush=True)
    header = (f"{'N':>6} {'profile':>7} {'classes':>7} | {'gemm s':>7} {'rows s':>7} {'ours s':>7} {'ref s':>8} | "
              f"{'ours/gemm':>9} {'range':>11} {'ours/rows':>9} {'ref/ours':>8} | {'gemm GB':>7} {'ours GB':>7} "
              f"{'ref GB':>7} | "
              f"{'mAP':>6} {'R@1':>6} | target")
    print(header)
    print("-" * len(header))
    notes, rows = [], []
    for n in (int(s) for s in args.sizes.split(",")):
        for profile in args.profiles.split(","):
            runs = {"gemm": [], "rows": [], "ours": []}
            for _ in range(args.repeats):
                for method in runs:
                    runs[method].append(measure(method, n, profile, args.noise, args.device, args.threads,
                                                args.chunks))
            ratios = [o["seconds"] / g["seconds"] for g, o in zip(runs["gemm"], runs["ours"])]
            gemm_s = statistics.median(r["seconds"] for r in runs["gemm"])
            ours_s = statistics.median(r["seconds"] for r in runs["ours"])
            rows_s = statistics.median(r["seconds"] for r in runs["rows"])
            ours = runs["ours"][0]
            if any(abs(r[k] - ours[k]) > 0 for r in runs["ours"] for k in ("mAP", "R@1")):
                raise AssertionError(f"N={n} {profile}: the runs of ours disagree")
            needed_gb = 12 * n * n / 1e9
            if needed_gb < args.reference_limit_gb and not args.chunks:
                ref = measure("reference", n, profile, args.noise, "cpu", args.threads)
                for key in ("mAP", "R@1"):
                    if abs(ref[key] - ours[key]) > 1e-6:
                        raise AssertionError(f"N={n} {profile}: {key} ours {ours[key]} != reference {ref[key]}")
                ref_s, ratio, ref_gb = f"{ref['seconds']:8.2f}", f"{ref['seconds'] / ours_s:8.1f}", \
                    f"{ref['peak_gb']:7.2f}"
            else:
                ref_s, ratio, ref_gb = f"{'skipped':>8}", f"{'-':>8}", f"{'-':>7}"
                notes.append(f"N={n} {profile}: reference skipped: " + (f"--chunks {args.chunks}" if args.chunks else
                                                                         f"needs {needed_gb:.1f} GB"))
            ceiling, peak = target(n, profile), max(r["peak_gb"] for r in runs["ours"])
            ok = ours_s / gemm_s <= ceiling and (n < 60502 or peak < 1.5)
            rows.append(ok)
            print(f"{n:>6} {profile:>7} {ours['classes']:>7} | {gemm_s:7.2f} {rows_s:7.2f} {ours_s:7.2f} {ref_s} | "
                  f"{ours_s / gemm_s:9.2f} {min(ratios):5.2f}-{max(ratios):<5.2f} {ours_s / rows_s:9.2f} {ratio} | "
                  f"{max(r['peak_gb'] for r in runs['gemm']):7.2f} {peak:7.2f} {ref_gb} | "
                  f"{100 * ours['mAP']:6.2f} {100 * ours['R@1']:6.2f} | <={ceiling} {'ok' if ok else 'MISSED'}",
                  flush=True)
    for note in notes:
        print(note)
    print(f"load average at end {load_average()}; 'range': min-max of the per-repeat ratios")


if __name__ == "__main__":
    main()
