#!/usr/bin/env python
"""Time and peak memory of exact retrieval evaluation: ours against the bare GEMM and the reference.

Synthetic unit-norm (N, 512) float32 embeddings with class structure (class centroid + noise), class
sizes CUB-like (about 60 per class) or SOP-like (2..12, mean about 5). Every measurement runs in a
fresh subprocess, so the peak RSS (``ru_maxrss``, which includes the interpreter, torch and the
embeddings) belongs to one method only:

- ``gemm``: the similarity ``query @ db.T`` over all queries in the chunks ``retrieval_metrics`` uses,
  result discarded: the floor for any exact method;
- ``ours``: ``retrieval_metrics(x, x, labels, labels, exclude_self=True)``;
- ``reference``: the reference's algorithm re-implemented (``test.py:find_ranks``: full N x N
  ``torch.mm`` and an ``argsort`` over the database axis; ``lib/utils/evaluate.py:compute_map``: a
  Python loop per query with ``isin`` and trapezoidal ``compute_ap``, the query as junk), run only
  where its N x N similarity + int64 ranks (12 N^2 bytes) fit in ``--reference-limit-gb``. Its mAP and
  R@1 must equal ours within 1e-6.

    python benchmarks/bench_eval.py                          # 5924, 20000, 60502; CUB and SOP classes
    python benchmarks/bench_eval.py --sizes 2000 --profiles sop
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lib.evaluation.metrics import default_chunk_size, retrieval_metrics  # noqa: E402

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

def run_gemm(x, labels):
    chunk = default_chunk_size(len(x))
    for begin in range(0, len(x), chunk):
        sims = x[begin:begin + chunk] @ x.T
        del sims
    return {}


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


METHODS = {"gemm": run_gemm, "ours": run_ours, "reference": run_reference}


def worker(method: str, n: int, profile: str, noise: float) -> None:
    x, labels = make_data(n, profile, noise=noise)
    start = time.perf_counter()
    result = METHODS[method](x, labels)
    seconds = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: kilobytes
    print(json.dumps({"seconds": seconds, "peak_gb": peak_gb, "classes": int(labels.max()) + 1, **result}))


def measure(method: str, n: int, profile: str, noise: float) -> dict:
    done = subprocess.run([sys.executable, __file__, "--worker", method, str(n), profile, "--noise", str(noise)],
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{method} N={n} {profile} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="5924,20000,60502", help="comma-separated N")
    parser.add_argument("--profiles", default="cub,sop", help="class-size profiles: cub (~60/class), sop (2..12)")
    parser.add_argument("--noise", type=float, default=0.1, help="per-coordinate noise around the class centroids")
    parser.add_argument("--reference-limit-gb", type=float, default=12.0,
                        help="run the reference only where 12 N^2 bytes fit in this")
    parser.add_argument("--worker", nargs=3, metavar=("METHOD", "N", "PROFILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args.worker[2], args.noise)
        return

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, D={DIM}, float32; "
          f"times in s, peak RSS in GB (whole process)")
    header = (f"{'N':>6} {'profile':>7} {'classes':>7} | {'gemm s':>7} {'ours s':>7} {'ref s':>8} | "
              f"{'ours/gemm':>9} {'ref/ours':>8} | {'gemm GB':>7} {'ours GB':>7} {'ref GB':>7} | {'mAP':>6} {'R@1':>6}")
    print(header)
    print("-" * len(header))
    notes = []
    for n in (int(s) for s in args.sizes.split(",")):
        for profile in args.profiles.split(","):
            gemm, ours = measure("gemm", n, profile, args.noise), measure("ours", n, profile, args.noise)
            needed_gb = 12 * n * n / 1e9
            if needed_gb < args.reference_limit_gb:
                ref = measure("reference", n, profile, args.noise)
                for key in ("mAP", "R@1"):
                    if abs(ref[key] - ours[key]) > 1e-6:
                        raise AssertionError(f"N={n} {profile}: {key} ours {ours[key]} != reference {ref[key]}")
                ref_s, ratio, ref_gb = f"{ref['seconds']:8.2f}", f"{ref['seconds'] / ours['seconds']:8.1f}", \
                    f"{ref['peak_gb']:7.2f}"
            else:
                ref_s, ratio, ref_gb = f"{'skipped':>8}", f"{'-':>8}", f"{'-':>7}"
                notes.append(f"N={n} {profile}: reference skipped: needs {needed_gb:.1f} GB")
            print(f"{n:>6} {profile:>7} {ours['classes']:>7} | {gemm['seconds']:7.2f} {ours['seconds']:7.2f} {ref_s} | "
                  f"{ours['seconds'] / gemm['seconds']:9.2f} {ratio} | {gemm['peak_gb']:7.2f} {ours['peak_gb']:7.2f} "
                  f"{ref_gb} | {100 * ours['mAP']:6.2f} {100 * ours['R@1']:6.2f}", flush=True)
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
