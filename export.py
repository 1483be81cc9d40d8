#!/usr/bin/env python
"""Export a trained student (the query network) for deployment: ONNX and/or TorchScript, each carrying
its preprocessing contract (input size, resize rule, mean/std, embedding dimension, the teacher it was
distilled against), so a client needs no other file.

    python export.py runs/<run>/model_best.pth --output exported/student     # student.onnx + student.pt
    python export.py runs/<run>/model_best.pth --formats onnx --image-size 48 --output exported/s48

The exported embeddings are checked against PyTorch's on random inputs before the command returns
(max abs difference printed; ``--tolerance``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from lib.checkpoint import load_checkpoint
from lib.models.loading import network_from_state
from lib.deploy.export import ONNX_OPSET, export_onnx, export_torchscript, load_exported
from lib.models.zoo import resolve_model_path
from lib.utils import run_script

SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("student", help="student checkpoint (model_best.pth), file in pretrained/, or published name")
    p.add_argument("--output", "-o", required=True, help="output path without suffix (.onnx / .pt are added)")
    p.add_argument("--formats", default="onnx,torchscript", help="comma-separated: onnx, torchscript")
    p.add_argument("--image-size", type=int, default=None, help="input size; default: the student's training size")
    p.add_argument("--opset", type=int, default=ONNX_OPSET, help="ONNX opset (17 runs on onnxruntime >= 1.11)")
    p.add_argument("--tolerance", type=float, default=1e-5, help="largest accepted |exported - PyTorch| on the check")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = sorted(set(formats) - set(SUFFIX))
    if unknown or not formats:
        raise SystemExit(f"--formats: unknown {unknown or formats}; choose from {', '.join(SUFFIX)}")
    path = resolve_model_path(args.student)
    state = load_checkpoint(path)
    net = network_from_state(state, str(path)).eval()
    size = args.image_size or net.meta.get("image_size")
    if not size:
        raise SystemExit(f"{path} records no training image size: give --image-size")
    teacher = state.get("teacher_fingerprint")
    if not teacher:
        print(f">> note: {path} records no teacher fingerprint; search.py will need --trust-pair", file=sys.stderr)
    probe = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = net(probe)
    written = {}
    for fmt in formats:
        target = Path(args.output).with_suffix(SUFFIX[fmt]) if Path(args.output).suffix != SUFFIX[fmt] else Path(args.output)
        if fmt == "onnx":
            contract = export_onnx(net, target, size, opset=args.opset, teacher_fingerprint=teacher)
        else:
            contract = export_torchscript(net, target, size, teacher_fingerprint=teacher)
        error = float((load_exported(target)(probe) - reference).abs().max())
        if error > args.tolerance:
            raise SystemExit(f"{target}: exported embeddings differ from PyTorch's by {error:.2e} > --tolerance {args.tolerance}")
        print(f">> {fmt}: {target} ({target.stat().st_size / 2**20:.1f} MiB), {size}px -> {contract['embedding_dim']}-d, "
              f"max |exported - PyTorch| = {error:.1e}")
        written[fmt] = str(target)
    print(">> contract: " + json.dumps({k: contract[k] for k in ("image_size", "mean", "std", "embedding_dim")})
          + f", resize: {contract['resize']['rule']}, teacher {str(contract['teacher_fingerprint'])[:12]}")
    return {"files": written, "contract": contract}


if __name__ == "__main__":
    run_script(main, "export.py")
