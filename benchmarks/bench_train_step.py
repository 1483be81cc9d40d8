#!/usr/bin/env python
"""Images per second of one ``ts_aug`` optimisation step: ours against the reference's step.

Both steps do: teacher forward at the teacher size, student forward/backward at the student size, the
absolute + relative losses, an AdamW step, on the same networks and the same batch. The reference's
step is re-implemented faithfully from its ``train.py`` / ``loss.py``: embeddings as D x N columns,
per-image ``bmm`` losses with ``+eps`` inside the squares, and a teacher forward *with* autograd (it
never disables gradients for the teacher, so backward also runs through the teacher). Ours runs the
teacher under ``no_grad`` with rows (N, D), plus AMP and channels_last on CUDA.

    python benchmarks/bench_train_step.py                      # CPU-sized defaults
    python benchmarks/bench_train_step.py --arch tv:resnet50 --image-size 224 --teacher-image-size 448 \
        --batch-size 8 --pos-num 8 --device cuda               # the paper's setting on a GPU
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib.embeddings import Embeddings  # noqa: E402
from lib.utils import autocast_context, resolve_amp  # noqa: E402
from lib.losses.distill import absolute_loss, relative_loss  # noqa: E402
from lib.models import build_network, set_batchnorm_eval  # noqa: E402


def reference_mse(x1, x2, eps=1e-6):
    d = (x1 - x2 + eps).pow(2)
    return d.sum(0).fill_diagonal_(0).sum() / (d.shape[1] * (d.shape[2] - 1))


def reference_regression(x1, x2, eps=1e-6):
    return (1 - (x1 * x2).sum(-1) + eps).pow(2).mean(-1).sum()


def reference_step(student, teacher, optimizer, s_in, t_in, lam_1, lam_2):
    b, p = s_in.shape[:2]
    s = student(s_in.flatten(0, 1)).t()  # D x N, as the reference's network returns
    t = teacher(t_in.flatten(0, 1)).t()  # autograd on: the reference never disables it
    s = s.t().reshape(-1, p, s.shape[0])
    t = t.t().reshape(-1, p, t.shape[0])
    loss = reference_regression(s, t)
    t_sim = torch.bmm(t, t.permute(0, 2, 1))
    loss = loss + lam_1 * reference_mse(torch.bmm(s, t.permute(0, 2, 1)), t_sim)
    loss = loss + lam_2 * reference_mse(torch.bmm(s, s.permute(0, 2, 1)), t_sim)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def our_step(student, teacher, optimizer, s_in, t_in, lam_1, lam_2, amp, channels_last, scaler):
    b, p = s_in.shape[:2]
    device = s_in.device
    s_flat, t_flat = s_in.flatten(0, 1), t_in.flatten(0, 1)
    if channels_last:
        s_flat = s_flat.contiguous(memory_format=torch.channels_last)
        t_flat = t_flat.contiguous(memory_format=torch.channels_last)
    with autocast_context(device, amp):
        with torch.no_grad():
            t = teacher(t_flat).float()
        s = student(s_flat).float()
    groups = torch.arange(b, device=device).repeat_interleave(p)
    batch = Embeddings(student=s, labels=groups, teacher=t, groups=groups)
    loss = absolute_loss(batch.student, batch.teacher) + lam_1 * relative_loss(s, t, t, groups) \
        + lam_2 * relative_loss(s, s, t, groups)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def timed(fn, steps, warmup, device):
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def networks(arch: str, whitening: int, device: torch.device):
    torch.manual_seed(0)
    base = build_network(arch, "gem", whitening, pretrained=False)

    def fresh():
        student, teacher = copy.deepcopy(base).to(device), copy.deepcopy(base).to(device)
        student.train()
        set_batchnorm_eval(student)
        teacher.eval()
        return student, teacher, torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=1e-6)

    return fresh


def time_our_step(arch: str = "tf_efficientnet_lite0", image_size: int = 64, teacher_image_size: int = 128,
                  batch_size: int = 4, pos_num: int = 4, whitening: int = 512, steps: int = 5, warmup: int = 2,
                  device="cpu", amp: str = "auto", channels_last=None):
    """Seconds per ``ts_aug`` step of ours and the AMP mode used (also called by bench_pipeline.py).
    ``channels_last`` None: on CUDA only."""
    device = torch.device(device)
    s_in = torch.randn(batch_size, pos_num, 3, image_size, image_size, device=device)
    t_in = torch.randn(batch_size, pos_num, 3, teacher_image_size, teacher_image_size, device=device)
    amp = resolve_amp(amp, device)
    channels_last = device.type == "cuda" if channels_last is None else channels_last
    student, teacher, opt = networks(arch, whitening, device)()
    if channels_last:
        student.to(memory_format=torch.channels_last)
        teacher.to(memory_format=torch.channels_last)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    seconds = timed(lambda: our_step(student, teacher, opt, s_in, t_in, 0.7, 0.7, amp, channels_last, scaler),
                    steps, warmup, device)
    return seconds, amp


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="tf_efficientnet_lite0")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--teacher-image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--pos-num", type=int, default=4)
    p.add_argument("--whitening", type=int, default=512)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"])
    p.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"],
                   help="channels_last inputs and networks for ours (auto: on CUDA)")
    p.add_argument("--skip-reference", action="store_true", help="time ours only")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    views = args.batch_size * args.pos_num
    ref = None
    if not args.skip_reference:
        s_in = torch.randn(args.batch_size, args.pos_num, 3, args.image_size, args.image_size, device=device)
        t_in = torch.randn(args.batch_size, args.pos_num, 3, args.teacher_image_size, args.teacher_image_size,
                           device=device)
        student, teacher, opt = networks(args.arch, args.whitening, device)()
        ref = timed(lambda: reference_step(student, teacher, opt, s_in, t_in, 0.7, 0.7), args.steps, args.warmup,
                    device)
    channels_last = {"auto": None, "on": True, "off": False}[args.channels_last]
    ours, amp = time_our_step(args.arch, args.image_size, args.teacher_image_size, args.batch_size, args.pos_num,
                              args.whitening, args.steps, args.warmup, device, args.amp, channels_last)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"{args.arch}, batch {args.batch_size} x {args.pos_num} views, student {args.image_size}px, "
          f"teacher {args.teacher_image_size}px, amp {amp or 'off'}, "
          f"channels_last {'on' if (channels_last if channels_last is not None else device.type == 'cuda') else 'off'}")
    print(f"{'step':<12}{'s/step':>10}{'images/s':>12}")
    if ref is not None:
        print(f"{'reference':<12}{ref:>10.3f}{views / ref:>12.1f}")
    print(f"{'ours':<12}{ours:>10.3f}{views / ours:>12.1f}")
    if ref is None:
        return None
    print(f"speed-up ours / reference: {ref / ours:.2f}x")
    return ref / ours


if __name__ == "__main__":
    main()
