#!/usr/bin/env python
"""Views per second that the ``ts_aug`` data path delivers, next to the views per second the networks
consume in a training step at the same sizes on the same device.

The data: ``--images`` JPEG files of 500 x 375 pixels (CUB's typical size; smooth random colour fields
plus noise, quality 90, written by this script into a temporary folder). The path: ``PairedViewDataset``
with ``PairedViews`` at the student's and the teacher's size (the paper: 224 / 448 px), ``--pos-num``
views per image (8), mixup (Beta(0.2, 0.2)), for each view backend:

- ``pil``: Pillow resize, float views normalised and mixed in the workers (bit-identical to earlier runs);
- ``tensor``: the colour jitter as one colour-table pass, torchvision's uint8 resize, mixup components
  lighter than ``--negligible-mixup`` not rendered, uint8 views shipped, mixed and normalised on the
  device (``mix_and_normalize``, timed as part of the consumer loop); ``--compare-samples`` prints how
  far its views are from ``pil``'s.

Figures: "per worker" is one process rendering samples in a loop with one torch thread (views per
second per CPU core; with ``--repeats`` R, R measurements alternating between the backends and their
median); then a ``DataLoader`` with 1, 2, 4, ... workers (batch ``--batch-size`` images,
``pin_memory`` on CUDA) timed from its first batch to its last; then the training step of
``bench_train_step.py`` (ours: teacher forward, student forward/backward, AdamW; AMP and channels_last on
CUDA) on random inputs of the same shape. "ratio" = pipeline views/s / network views/s: below 1, the
input pipeline is what limits training.

    python benchmarks/bench_pipeline.py                                  # CPU: lite0, 1 and 2 workers
    python benchmarks/bench_pipeline.py --device cuda --arch tv:resnet50 --workers 1,2,4,8
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from lib.data.training import MIXUP_NEGLIGIBLE, PairedViewDataset  # noqa: E402
from lib.data.transforms import VIEW_BACKENDS, PairedViews, mix_and_normalize  # noqa: E402

NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def write_jpegs(folder: str, count: int, width: int = 500, height: int = 375, seed: int = 0):
    """``count`` JPEG files of natural-image statistics: a smooth random colour field plus pixel noise."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        field = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
        pixels = np.asarray(field, dtype=np.int16) + rng.integers(-24, 25, (height, width, 3))
        path = os.path.join(folder, f"{i:04d}.jpg")
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def dataset(paths, backend: str, sizes, pos_num: int, mixup: float, negligible_mixup: float = MIXUP_NEGLIGIBLE):
    views = PairedViews(list(sizes), [NORM, NORM], scale=(0.08, 1.0), backend=backend)
    return PairedViewDataset(paths, list(range(len(paths))), views, pos_num, mixup, seed=0,
                             negligible_mixup=negligible_mixup)


def finish(batch, device: torch.device):
    """The consumer's side: move to the device; the 'tensor' backend mixes and normalises there."""
    if len(batch) == 5:
        s, t, w = (x.to(device, non_blocking=True) for x in batch[:3])
        return mix_and_normalize(s, w, *NORM), mix_and_normalize(t, w, *NORM)
    return batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)


def per_worker(paths, backend, sizes, pos_num, mixup, samples, device, negligible_mixup=MIXUP_NEGLIGIBLE):
    """(views/s, views with a dropped mixup component) of one process, one torch thread, including the
    device-side finishing of its samples."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = dataset(paths, backend, sizes, pos_num, mixup, negligible_mixup)
        finish(torch.utils.data.default_collate([data[0]]), device)  # warm-up
        _sync(device)
        start, dropped = time.perf_counter(), 0
        for i in range(samples):
            batch = torch.utils.data.default_collate([data[(i + 1) % len(paths)]])
            finish(batch, device)
            if len(batch) == 5:
                dropped += int((batch[2] == 0).any(-1).sum())
        _sync(device)
        return samples * pos_num / (time.perf_counter() - start), dropped
    finally:
        torch.set_num_threads(threads)


def view_differences(paths, sizes, pos_num, mixup, samples, negligible_mixup=MIXUP_NEGLIGIBLE):
    """|tensor - pil| in grey levels over every pixel of the views of the first ``samples`` samples
    (mixed and normalised as training sees them): (mean, max, share over 2, share over 5)."""
    old = dataset(paths, "pil", sizes, pos_num, mixup)
    new = dataset(paths, "tensor", sizes, pos_num, mixup, negligible_mixup)
    std = torch.tensor(NORM[1]).view(3, 1, 1)
    levels = []
    for i in range(samples):
        reference, ours = old[i % len(paths)], new[i % len(paths)]
        for k in range(2):
            levels.append((((mix_and_normalize(ours[k], ours[2], *NORM) - reference[k]) * std).abs() * 255).flatten())
    levels = torch.cat(levels)
    return (float(levels.mean()), float(levels.max()), float((levels > 2).float().mean()),
            float((levels > 5).float().mean()))


def with_loader(paths, backend, sizes, pos_num, mixup, workers, batches, batch_size, device,
                negligible_mixup=MIXUP_NEGLIGIBLE) -> float:
    data = dataset(paths, backend, sizes, pos_num, mixup, negligible_mixup)
    indices = list(range(batch_size * (batches + 1)))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data, [i % len(paths) for i in indices]),
                                         batch_size=batch_size, num_workers=workers,
                                         pin_memory=device.type == "cuda",
                                         prefetch_factor=2 if workers else None)  # 0: in-process loading
    start, seen = None, 0
    for i, batch in enumerate(loader):
        finish(batch, device)
        if i == 0:  # the first batch carries the workers' start-up
            _sync(device)
            start = time.perf_counter()
        else:
            seen += len(batch[-1]) * pos_num
    _sync(device)
    return seen / (time.perf_counter() - start)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--arch", default=None, help="network of the step (default: tv:resnet50 on CUDA, "
                                                "tf_efficientnet_lite0 on the CPU)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--teacher-image-size", type=int, default=448)
    p.add_argument("--pos-num", type=int, default=8)
    p.add_argument("--mixup-alpha", type=float, default=0.2)
    p.add_argument("--batch-size", type=int, default=8, help="images per batch (each gives --pos-num views)")
    p.add_argument("--images", type=int, default=48, help="JPEG files written")
    p.add_argument("--samples", type=int, default=6, help="samples rendered by the single-process measurement")
    p.add_argument("--repeats", type=int, default=1, help="single-process measurements per backend, interleaved "
                                                          "across backends; the table shows their median")
    p.add_argument("--batches", type=int, default=3, help="batches timed per DataLoader (after the first)")
    p.add_argument("--workers", default="1,2", help="comma-separated DataLoader worker counts")
    p.add_argument("--backends", default=",".join(VIEW_BACKENDS))
    p.add_argument("--steps", type=int, default=2, help="timed training steps (after one warm-up)")
    p.add_argument("--skip-step", action="store_true", help="do not time the network step")
    p.add_argument("--negligible-mixup", type=float, default=MIXUP_NEGLIGIBLE,
                   help="'tensor': mixup components lighter than this are not rendered (0: render all)")
    p.add_argument("--compare-samples", type=int, default=0, help="also compare the 'tensor' views of this many "
                                                                   "samples with the 'pil' ones (grey levels)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    arch = args.arch or ("tv:resnet50" if device.type == "cuda" else "tf_efficientnet_lite0")
    sizes = (args.image_size, args.teacher_image_size)
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"ts_aug input pipeline: {args.pos_num} views/image at {sizes[0]}/{sizes[1]} px, mixup "
          f"{args.mixup_alpha}, 500x375 JPEG; device {device} ({where}); {os.cpu_count()} CPUs; "
          f"load average {load}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        paths = write_jpegs(folder, args.images)
        if args.compare_samples:
            mean, worst, over2, over5 = view_differences(paths, sizes, args.pos_num, args.mixup_alpha,
                                                         args.compare_samples, args.negligible_mixup)
            print(f"  |tensor - pil| over {args.compare_samples} samples x {args.pos_num} views: mean {mean:.3f} "
                  f"levels, max {worst:.1f}, {100 * over2:.2f}% of pixels over 2 levels, {100 * over5:.3f}% over 5",
                  flush=True)
        backends = args.backends.split(",")
        per_rep, dropped = {backend: [] for backend in backends}, {}
        for rep in range(args.repeats):  # interleaved, so a change of load hits every backend alike
            for backend in backends:
                rate, dropped[backend] = per_worker(paths, backend, sizes, args.pos_num, args.mixup_alpha, args.samples,
                                           device, args.negligible_mixup)
                per_rep[backend].append(rate)
            print(f"  per worker, repetition {rep + 1}: "
                  + ", ".join(f"{b} {per_rep[b][-1]:.1f}" for b in backends) + " views/s", flush=True)
        for backend in backends:
            rate = float(np.median(per_rep[backend]))
            rows.append((backend, "1 process, 1 thread", rate))
            note = (f"; {dropped[backend]} of {args.samples * args.pos_num} timed views drop a mixup component lighter "
                    f"than {args.negligible_mixup:.4f}" if backend == "tensor" and args.mixup_alpha > 0 else "")
            print(f"  {backend}: {rate:.1f} views/s per worker (median of {args.repeats}){note}", flush=True)
        for backend in backends:
            for w in (int(x) for x in args.workers.split(",")):
                rate = with_loader(paths, backend, sizes, args.pos_num, args.mixup_alpha, w, args.batches,
                                   args.batch_size, device, args.negligible_mixup)
                rows.append((backend, f"DataLoader, {w} workers", rate))
                print(f"  {backend}: {rate:.1f} views/s with {w} workers", flush=True)
    consumed = None
    if not args.skip_step:
        from bench_train_step import time_our_step

        seconds, amp = time_our_step(arch, args.image_size, args.teacher_image_size, args.batch_size, args.pos_num,
                                     512, args.steps, 1, device)
        consumed = args.batch_size * args.pos_num / seconds
        print(f"  network step ({arch}, batch {args.batch_size} x {args.pos_num}, amp {amp or 'off'}): "
              f"{consumed:.1f} views/s", flush=True)
    print()
    print(f"{'backend':<8} {'setting':<24} {'views/s':>9} {'x pil':>7} {'ratio to network':>17}")
    base = {setting: rate for backend, setting, rate in rows if backend == "pil"}
    for backend, setting, rate in rows:
        speedup = f"{rate / base[setting]:7.2f}" if setting in base else f"{'-':>7}"
        ratio = f"{rate / consumed:17.2f}" if consumed else f"{'-':>17}"
        print(f"{backend:<8} {setting:<24} {rate:9.1f} {speedup} {ratio}")
    if consumed:
        print(f"{'network':<8} {arch + ' step':<24} {consumed:9.1f}")
    print(f"load average at end {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return rows, consumed


if __name__ == "__main__":
    main()
