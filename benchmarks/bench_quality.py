#!/usr/bin/env python
"""Retrieval quality from scratch: the tables of experiments/README.md ("cjk-glyphs"), rerun and printed.

    python benchmarks/bench_quality.py                    # everything (hours on 2 CPU cores, minutes on a GPU)
    python benchmarks/bench_quality.py --only default     # the embedded default alone (python main.py)
    python benchmarks/bench_quality.py --only teacher,students --out runs/quality
    python benchmarks/bench_quality.py --only students --configs 'ts_aug-lite0-64-label-csd-*' \
        --teacher-path runs/glyphs/teacher-lite2-128/model_best.pth   # a few students, a teacher already made

Stages (each a fresh run directory under --out, seeds fixed by the configs):

* ``imagenet``: the backbones' ImageNet weights as they are on cjk-glyphs-test (lite2 at 128 px,
  lite0 at 64 and 32 px), the start the teacher must beat by 10 mAP points;
* ``teacher``: experiments/glyphs/teacher-lite2-128.yaml (``sym``), its test mAP at 128 px and, as the
  information bound of a low-resolution query, at 64 and 32 px;
* ``students``: every other experiments/glyphs/*.yaml against that teacher: asymmetric mAP and R@1 as a
  share of the teacher's symmetric ones, student-teacher cosine and self-R@1 (a ``sym`` config, a
  reference trained without the teacher: its symmetric row; a config whose ``student_path`` or
  ``teacher_path`` is another config's run trains after it, from that run as made here; a reference
  that teaches a student is also tested at that student's size, its information bound);
* ``default``: ``python main.py`` (the embedded cjk-glyphs-mini), its whole table.

Figures are measured, never typed in: what this prints is what the runs gave.
"""
from __future__ import annotations

import argparse
import contextlib
import fnmatch
import graphlib
import io
import json
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lib.config import Config, read_yaml  # noqa: E402

STAGES = ("imagenet", "teacher", "students", "default")
GLYPHS = ROOT / "experiments" / "glyphs"
TEACHER_CONFIG = GLYPHS / "teacher-lite2-128.yaml"


def _quiet(fn, *args, verbose: bool = False):
    if verbose:
        return fn(*args)
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def _test(argv, verbose):
    import test as test_module

    result = _quiet(test_module.main, argv, verbose=verbose)
    return next(iter(result["datasets"].values()))


def _train(argv, verbose):
    import main as main_module

    return _quiet(main_module.main, argv, verbose=verbose)


def _row(name, metrics, keys=("mAP", "R@1", "mAP/T", "R@1/T", "cos", "self-R@1")):
    cells = [f"{100 * metrics[k]:7.2f}" if isinstance(metrics.get(k), float) else "      -" for k in keys]
    return f"{name:<58}" + " ".join(cells)


def imagenet(out: Path, verbose: bool):
    rows = {}
    for arch, size in (("tf_efficientnet_lite2", 128), ("tf_efficientnet_lite0", 64), ("tf_efficientnet_lite0", 32)):
        got = _test(["--student", arch, "--image-size", str(size), "--datasets", "cjk-glyphs-test",
                     "--output", str(out / f"imagenet-{arch}-{size}.json"), "--workers", "2"], verbose)
        rows[f"ImageNet {arch} sym {size}px"] = got["sym"]
    return rows


def teacher(out: Path, verbose: bool):
    run = out / "teacher-lite2-128"
    result = _train(["--config", str(TEACHER_CONFIG), "--directory", str(run), "--overwrite"], verbose)
    table = next(iter(result["test"].values()))
    rows = {"teacher lite2 sym 128px (trained)": next(iter(table.values()))}
    for size in (64, 32):  # the information bound of a query at this size: the teacher's own symmetric mAP
        got = _test(["--student-path", str(run / "model_best.pth"), "--image-size", str(size),
                     "--datasets", "cjk-glyphs-test", "--output", str(out / f"teacher-at-{size}.json"),
                     "--workers", "2"], verbose)
        rows[f"teacher lite2 sym {size}px (information bound)"] = got["sym"]
    return rows


def _made_by(configs: dict, config: dict, key: str) -> str:
    """The config whose run ``config[key]`` names (runs/glyphs/<config>/<file>), else ''."""
    name = Path(config.get(key) or "").parent.name
    return name if name in configs else ""


def select_configs(configs: dict, patterns: str) -> dict:
    """The configs whose names match one of the comma-separated shell patterns, with the configs whose
    runs they start from or learn from (``student_path``, ``teacher_path``), recursively: a student is
    never trained against a run this benchmark did not make. ``*`` (the default) keeps them all."""
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    matches = {p: {name for name in configs if fnmatch.fnmatchcase(name, p)} for p in wanted}
    chosen = set().union(*matches.values())
    unmatched = [p for p, names in matches.items() if not names]
    if unmatched or not chosen:
        raise SystemExit(f"--configs: {unmatched or wanted} match(es) none of experiments/glyphs/*.yaml "
                         f"(the teacher excluded): {sorted(configs)}")
    pending = list(chosen)
    while pending:
        config = configs[pending.pop()]
        for key in ("student_path", "teacher_path"):
            made = _made_by(configs, config, key)
            if made and made not in chosen:
                chosen.add(made)
                pending.append(made)
    return {name: config for name, config in configs.items() if name in chosen}


def training_order(configs: dict) -> list:
    """The names of ``configs``, each after the configs whose runs it starts from or learns from: a
    restart from another student's run, a student of a reference trained alone (``sym``)."""
    graph = graphlib.TopologicalSorter()  # raises graphlib.CycleError on configs that name each other
    for name in sorted(configs):
        made = (_made_by(configs, configs[name], key) for key in ("student_path", "teacher_path"))
        graph.add(name, *filter(None, made))
    return list(graph.static_order())


def students(out: Path, verbose: bool, patterns: str = "*", teacher_path: Optional[Path] = None):
    teacher_path = teacher_path or out / "teacher-lite2-128" / "model_best.pth"
    if not teacher_path.is_file():
        raise FileNotFoundError(f"{teacher_path}: run the 'teacher' stage first (--only teacher), or name a trained "
                                f"teacher with --teacher-path")
    rows = {}
    every = {config.stem: read_yaml(config) for config in sorted(GLYPHS.glob("*.yaml")) if config != TEACHER_CONFIG}
    configs = select_configs(every, patterns)
    default_size = Config().image_size  # a config without image_size trains at the default's

    for name in training_order(configs):
        config, run = GLYPHS / f"{name}.yaml", out / name
        alone = configs[name].get("mode") == "sym"  # a reference trained without the teacher
        paths = {} if alone else {"teacher_path": teacher_path}
        for key in ("teacher_path", "student_path"):  # that config's run, as made here
            made = _made_by(configs, configs[name], key)
            if made:
                paths[key] = out / made / Path(configs[name][key]).name
        argv = ["--config", str(config), "--directory", str(run), "--overwrite"]
        for key, path in paths.items():
            argv += [f"--{key.replace('_', '-')}", str(path)]
        result = _train(argv, verbose)
        table = next(iter(result["test"].values()))
        for row, metrics in table.items():
            if row.startswith("student asym") or row.startswith("student sym"):
                rows[f"{name}: {row}"] = metrics
        # a reference that teaches another config: its own mAP at that student's size, the information bound
        sizes = sorted({int(c.get("image_size", default_size)) for c in configs.values()
                        if _made_by(configs, c, "teacher_path") == name})
        for size in sizes:
            got = _test(["--student-path", str(run / "model_best.pth"), "--image-size", str(size),
                         "--datasets", "cjk-glyphs-test", "--output", str(out / f"{name}-at-{size}.json"),
                         "--workers", "2"], verbose)
            rows[f"{name}: sym {size}px (information bound)"] = got["sym"]
    return rows


def default(out: Path, verbose: bool):
    result = _train(["--directory", str(out / "default"), "--overwrite"], verbose)
    return next(iter(result["test"].values()))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(STAGES), help=f"comma-separated stages of {STAGES}")
    parser.add_argument("--out", default="runs/quality", help="folder of the run directories and quality.json")
    parser.add_argument("--configs", default="*",
                        help="students stage: comma-separated shell patterns of experiments/glyphs/*.yaml names to "
                             "run (the runs they start from are added); default all")
    parser.add_argument("--teacher-path", type=Path, default=None,
                        help="students stage: a trained teacher checkpoint to use instead of the teacher stage's "
                             "run under --out (e.g. runs/glyphs/teacher-lite2-128/model_best.pth)")
    parser.add_argument("--verbose", action="store_true", help="show the runs' own output")
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise SystemExit(f"--only: unknown stage(s) {unknown}; choose from {STAGES}")
    if "students" not in stages and (args.configs != "*" or args.teacher_path is not None):
        raise SystemExit("--configs and --teacher-path choose what the 'students' stage runs; add it to --only")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {}
    for stage in stages:
        start = time.time()
        if stage == "students":
            rows = students(out, args.verbose, args.configs, args.teacher_path)
        else:
            rows = globals()[stage](out, args.verbose)
        report[stage] = {"rows": rows, "seconds": time.time() - start}
        print(f"\n== {stage} ({time.time() - start:.0f} s)")
        print(f"{'':<58}{'mAP':>7} {'R@1':>7} {'mAP/T':>7} {'R@1/T':>7} {'cos':>7} {'selfR@1':>7}")
        for name, metrics in rows.items():
            print(_row(name, metrics))
    (out / "quality.json").write_text(json.dumps(report, indent=1, default=float))
    print(f"\n>> written to {out / 'quality.json'}")
    return report


if __name__ == "__main__":
    main()
