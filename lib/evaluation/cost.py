"""What one query costs: parameters, FLOPs and measured CPU latency of a network at a resolution.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on one (1, 3, S, S) forward: every
convolution and matrix product, counted as 2 x multiply-accumulates (element-wise work such as
activations and pooling is not counted). Latency is wall-clock time of a batch-1 forward on the CPU
(``torch.no_grad``, eval mode), the median of ``repeats`` timed runs after ``warmup`` untimed ones, with
``threads`` intra-op threads (restored afterwards); the network is copied to the CPU, the original is
not moved.
"""
from __future__ import annotations

import copy
import statistics
import time
from typing import Dict, Mapping, Optional, Tuple

import torch
from torch import nn

#: the per-row columns that :func:`add_query_cost` adds to a results table
COST_COLUMNS = ("q-Mparams", "q-GFLOPs", "q-ms")


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@torch.no_grad()
def count_flops(net: nn.Module, image_size: int) -> int:
    """FLOPs of one forward of a (1, 3, S, S) image, by torch's own flop counter."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        net(torch.zeros(1, 3, image_size, image_size, device=device))
    net.train(was_training)
    return int(counter.get_total_flops())


@torch.no_grad()
def cpu_latency_ms(net: nn.Module, image_size: int, *, threads: int = 1, repeats: int = 20, warmup: int = 3,
                   budget_s: float = 20.0) -> float:
    """Median wall-clock milliseconds of a batch-1 CPU forward (fewer repeats, at least 3, when they would
    take more than ``budget_s``)."""
    cpu_net = copy.deepcopy(net).cpu().eval()
    image = torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    previous = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        for _ in range(max(0, warmup)):
            cpu_net(image)
        times, started = [], time.perf_counter()
        while len(times) < max(1, repeats) and (len(times) < 3 or time.perf_counter() - started < budget_s):
            t0 = time.perf_counter()
            cpu_net(image)
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(previous)
    return 1000 * statistics.median(times)


def query_cost(net: nn.Module, image_size: int, *, threads: int = 1, repeats: int = 20, warmup: int = 3,
               latency: bool = True) -> Dict[str, float]:
    """``{'params', 'GFLOPs', 'ms', 'threads', 'image_size'}`` of ``net`` at ``image_size`` (see module doc);
    ``latency=False`` skips the timing (``ms`` absent)."""
    cost = {"image_size": int(image_size), "params": count_parameters(net),
            "GFLOPs": count_flops(net, int(image_size)) / 1e9}
    if latency:
        cost.update(ms=cpu_latency_ms(net, int(image_size), threads=threads, repeats=repeats, warmup=warmup),
                    threads=int(threads), repeats=int(repeats))
    return cost


def query_costs(nets: Mapping[str, Tuple[Optional[nn.Module], int]], **kwargs) -> Dict[str, Dict[str, float]]:
    """:func:`query_cost` for each ``key: (net, image_size)`` (``net`` None: skipped); a network at a size
    is measured once even if several keys name it."""
    seen: Dict[Tuple[int, int], Dict[str, float]] = {}
    out = {}
    for key, (net, size) in nets.items():
        if net is None or not size:
            continue
        ident = (id(net), int(size))
        if ident not in seen:
            seen[ident] = query_cost(net, int(size), **kwargs)
        out[key] = dict(seen[ident])
    return out


def add_query_cost(results: Dict[str, Dict[str, float]], settings: Mapping[str, Tuple[str, str]],
                   costs: Mapping[str, Mapping[str, float]]) -> Dict[str, Dict[str, float]]:
    """Add the query side's cost to each row of ``results``: ``q-Mparams``, ``q-GFLOPs`` and (when
    measured) ``q-ms``, from ``costs[query key]`` of the row's setting ``(query key, database key)``."""
    for name, (query_key, _) in settings.items():
        cost = costs.get(query_key)
        if name not in results or cost is None:
            continue
        results[name]["q-Mparams"] = cost["params"] / 1e6
        results[name]["q-GFLOPs"] = cost["GFLOPs"]
        if "ms" in cost:
            results[name]["q-ms"] = cost["ms"]
    return results


_FORMATS = {"q-Mparams": "{:.2f}", "q-GFLOPs": "{:.3f}", "q-ms": "{:.2f}"}


def format_cost_table(rows: Mapping[str, Mapping[str, float]], title: str = "query-side cost") -> str:
    """The cost columns of ``rows`` (after :func:`add_query_cost`) as a fixed-width table: millions of
    parameters, GFLOPs per image and CPU milliseconds per image (batch 1) of each row's query network."""
    rows = {name: r for name, r in rows.items() if any(c in r for c in COST_COLUMNS)}
    present = [c for c in COST_COLUMNS if any(c in r for r in rows.values())]
    width = max([len(title)] + [len(k) for k in rows]) + 2
    lines = [title.ljust(width) + "".join(c.rjust(11) for c in present)]
    for name, metrics in rows.items():
        lines.append(name.ljust(width) + "".join((_FORMATS[c].format(metrics[c]) if c in metrics else "-").rjust(11)
                                                 for c in present))
    return "\n".join(lines)


def cost_summary(student: Mapping[str, float], teacher: Mapping[str, float]) -> str:
    """One line: how many times cheaper the student's query is than the teacher's."""
    parts = [f"student {student['image_size']}px: {student['GFLOPs']:.3f} GFLOPs, {student['params'] / 1e6:.2f}M params",
             f"teacher {teacher['image_size']}px: {teacher['GFLOPs']:.3f} GFLOPs, {teacher['params'] / 1e6:.2f}M params"]
    ratio = f"{teacher['GFLOPs'] / max(student['GFLOPs'], 1e-12):.1f}x fewer FLOPs"
    if "ms" in student and "ms" in teacher:
        parts[0] += f", {student['ms']:.2f} ms"
        parts[1] += f", {teacher['ms']:.2f} ms"
        ratio += f", {teacher['ms'] / max(student['ms'], 1e-12):.1f}x faster (CPU, batch 1, {student['threads']} thread" \
                 f"{'s' if student['threads'] != 1 else ''})"
    return f"query cost: {parts[0]}; {parts[1]}; the student's query: {ratio}"


__all__ = ["COST_COLUMNS", "count_parameters", "count_flops", "cpu_latency_ms", "query_cost", "query_costs",
           "add_query_cost", "format_cost_table", "cost_summary"]
