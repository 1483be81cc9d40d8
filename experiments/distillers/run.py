"""Every distiller under one protocol: run the configs of ``experiments/distillers/`` one after another
and print the table of the test results (asym mAP, R@1, % of the teacher's symmetric mAP; mean and
spread over seeds).

    python experiments/distillers/run.py                         # every config, seed 1234
    python experiments/distillers/run.py --top 5 --seeds 1234,1,2  # then more seeds for the five best
    python experiments/distillers/run.py --tune ts_aug,ts_aug+csd  # optuna on the validation classes, then test
    python experiments/distillers/run.py --tune all --top 5 --seeds 1234,1,2  # all of it: every config tuned too
    python experiments/distillers/run.py --table-only             # print the table of what has run

Each run goes to ``runs/distillers/<config>-s<seed>/`` and is skipped when its ``results.json`` exists,
so the script resumes where it stopped. Runs are started under ``nice -n 10`` and no new run starts
after ``--budget-minutes``. The student's starting point (``--student-init auto``: the teacher's weights
with the whitening regressed onto the teacher's embeddings) is the same for every run; it is computed
once into ``runs/distillers/student-init.pth`` and the configs start from it (``student_path``), which
saves recomputing it in every run. Its own test is the table's "start (no training)" row.

``--tune`` runs ``main.py --optimize`` for the named configs (``runs/distillers/<config>-tuned-s<seed>/``):
``--trials`` trials on the validation classes (the second half of the training characters, trained on
the first half), then the final run with the best values on train+val, tested once. With ``--top N``
and more than one seed, the N best tuned configs of the first seed then train again with the other
seeds from the values their search found (``config_final.json``), without searching again. ``ts_aug`` searches
the paper's space (lr, lam-1, lam-2); a config with a distiller searches that distiller's weight over
[0.1, 10] times its configured weight (log scale) and nothing else, so that the tuning concerns the
distiller. Rows "<config> (tuned)" join the table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))  # the toolkit's lib/ and main.py
RUNS = ROOT / "runs" / "distillers"
TEACHER = RUNS / "teacher.pth"
INIT = RUNS / "student-init.pth"
STUDENT_ROW, TEACHER_ROW = "student asym (S@96 -> T@128)", "teacher sym (128px)"


# the running order: the paper's ts_aug, then each distiller alone and added to ts_aug
PEERS = ("fitnet", "d3still", "csd", "rop", "rkd", "pkt", "cc", "fitnet-cosine")
ORDER = ("ts_aug",) + tuple(x for p in PEERS for x in (p, f"ts_aug+{p}"))


def nice() -> list:
    """``nice`` up to niceness 10 (not beyond: ``nice -n 10`` inside a script started with ``nice -n 10``
    would give 19 and starve the runs on a shared machine)."""
    current = os.nice(0)
    return ["nice", "-n", str(10 - current)] if current < 10 else []


def configs():
    found = {p.stem for p in HERE.glob("*.yaml")}
    return [n for n in ORDER if n in found] + sorted(found - set(ORDER))


def make_student_init() -> None:
    """The student of ``--student-init auto`` on the training data of the configs (train+val)."""
    import torch

    from lib.cache import EmbeddingCache
    from lib.checkpoint import atomic_save, get_network, load_network, network_state
    from lib.config import load_config
    from lib.data.splits import load_split
    from lib.student_init import initialise_student
    from lib.utils import seed_everything
    from main import CACHE_DIR, training_data

    cfg = load_config(["--config", str(HERE / "ts_aug.yaml")])
    split = load_split(cfg.training_dataset, str(ROOT / cfg.data_root), val_ratio=cfg.val_ratio)
    paths, labels = training_data(split, with_val=not cfg.val)
    seed_everything(cfg.seed)  # as main.py's run_stage does before building the student
    teacher = load_network(str(ROOT / cfg.teacher_path)).eval()
    student = get_network(cfg.student, None, pooling=cfg.pool, whitening=cfg.whitening, pretrained=cfg.pretrained,
                          image_size=cfg.image_size)
    student.meta["image_size"] = cfg.image_size
    cpu = torch.device("cpu")
    done = initialise_student("auto", student, teacher, paths, labels, image_size=cfg.image_size,
                              teacher_image_size=cfg.teacher_image_size, device=cpu, teacher_device=cpu,
                              workers=cfg.workers, cache=EmbeddingCache(str(ROOT / CACHE_DIR)))
    print(f">> student initialisation: {done}", flush=True)
    atomic_save(network_state(student, epoch=0, mode="ts_aug"), INIT)


def pending(out: Path) -> bool:
    """Whether the run of ``out`` is still to do (no ``results.json``); an interrupted one is cleared."""
    if (out / "results.json").is_file():
        return False
    if out.exists():  # an interrupted run: start it again
        import shutil

        shutil.rmtree(out)
    return True


def run_one(name: str, seed: int) -> Path:
    out = RUNS / f"{name}-s{seed}"
    return launch(name, f"{name} seed {seed}", out, ["--seed", str(seed)]) if pending(out) else out


def within_budget(plan: list, run, started: float, minutes: float) -> list:
    """``run(name, seed)`` for each pair of ``plan`` while fewer than ``minutes`` have passed since
    ``started``; returns the pairs not started."""
    for i, (name, seed) in enumerate(plan):
        if (time.time() - started) / 60 > minutes:
            return plan[i:]
        run(name, seed)
    return []


def launch(name: str, label: str, out: Path, flags: list, config: Optional[Path] = None) -> Path:
    """``main.py --config <config> --directory <out> <flags>`` under ``nice`` (``config``: ``<name>.yaml`` by
    default), its wall clock in ``wall_s.txt``."""
    command = [*nice(), sys.executable, "main.py", "--config", str(config or HERE / f"{name}.yaml"),
               "--directory", str(out.relative_to(ROOT)), *flags]
    started = time.time()
    print(f">> {label}: {' '.join(command[command.index('main.py'):])}", flush=True)
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    (out / "wall_s.txt").write_text(f"{time.time() - started:.0f}\n")
    print(f"   done in {time.time() - started:.0f} s", flush=True)
    return out


def test_start() -> Path:
    out = RUNS / "start.json"
    if not out.is_file():
        subprocess.run([*nice(), sys.executable, "test.py", "--student-path", str(INIT.relative_to(ROOT)),
                        "--teacher-path", str(TEACHER.relative_to(ROOT)), "--datasets", "cjk-glyphs-mini-test", "--sym",
                        "--teacher-image-size", "128", "--output", str(out.relative_to(ROOT)), "--no-cost"],
                       cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return out


def distiller_objective(name: str):
    """(objective name, configured weight) of the distiller a config adds, or None (``ts_aug``)."""
    from lib.config import read_yaml
    from lib.losses.base import parse_objective_spec

    specs = [parse_objective_spec(s) for s in read_yaml(HERE / f"{name}.yaml").get("objective", [])]
    peers = [spec for spec in specs if spec.name not in ("absolute", "relative_st", "relative_ss")]
    return (peers[-1].name, peers[-1].weight) if peers else None


def search_flags(name: str) -> list:
    """``main.py`` flags of the search space of ``--tune`` (see the module's docstring)."""
    peer = distiller_objective(name)
    if peer is None:
        return []  # the paper's space: lr, lam_1, lam_2
    objective, weight = peer
    return ["--search", "lr=off", "--search", "lam_1=off", "--search", "lam_2=off",
            "--search", f"objective.{objective}.weight={weight / 10:g}:{weight * 10:g}:log"]


def tune_one(name: str, seed: int, trials: int) -> Path:
    out = RUNS / f"{name}-tuned-s{seed}"
    if (out / "results.json").is_file():
        return out
    resume = ["--resume"] if (out / "study.db").exists() else []  # a killed search continues
    return launch(name, f"{name} seed {seed}, tuned", out,
                  ["--optimize", "--trials", str(trials), *search_flags(name), *resume, "--seed", str(seed)])


def rerun_tuned(name: str, seed: int, first: int) -> Path:
    """The tuned config of ``name`` (``config_final.json`` of its search with seed ``first``: the configured
    values with the best ones found) trained and tested again with another ``seed``, without a search."""
    out = RUNS / f"{name}-tuned-s{seed}"
    if not pending(out):
        return out
    final = RUNS / f"{name}-tuned-s{first}" / "config_final.json"
    return launch(name, f"{name} seed {seed}, tuned", out, ["--no-optimize", "--seed", str(seed)],
                  config=final.relative_to(ROOT))


def read_run(path: Path):
    table = json.loads((path / "results.json").read_text())["test"]["cjk-glyphs-mini-test"]
    asym = table[STUDENT_ROW]
    return {"mAP": asym["mAP"], "R@1": asym["R@1"], "mAP/T": asym["mAP/T"],
            "sym mAP": table["student sym (96px)"]["mAP"], "teacher": table[TEACHER_ROW]["mAP"]}


def collect(seeds_of, tuned: bool = True):
    rows = {}
    for name in configs():
        for suffix, label in (("", name), ("-tuned", f"{name} (tuned)")) if tuned else (("", name),):
            found = [read_run(RUNS / f"{name}{suffix}-s{s}") for s in seeds_of(name)
                     if (RUNS / f"{name}{suffix}-s{s}" / "results.json").is_file()]
            if found:
                rows[label] = found
    return rows


def mean_spread(values):
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else None
    return mean, spread


def cell(values, key):
    mean, spread = mean_spread([100 * v[key] for v in values])
    return f"{mean:.2f}" + (f" ± {spread:.2f}" if spread is not None else "")


def table(rows, start=None) -> str:
    order = sorted(rows, key=lambda n: -mean_spread([v["mAP"] for v in rows[n]])[0])
    lines = ["| config | seeds | asym mAP | asym R@1 | % of teacher-sym mAP | student sym mAP |",
             "|---|---|---|---|---|---|"]
    for name in order:
        values = rows[name]
        lines.append(f"| {name} | {len(values)} | {cell(values, 'mAP')} | {cell(values, 'R@1')} | "
                     f"{cell(values, 'mAP/T')} | {cell(values, 'sym mAP')} |")
    if start is not None:
        lines.append(f"| start (no training) | - | {100 * start['mAP']:.2f} | {100 * start['R@1']:.2f} | "
                     f"{100 * start['mAP/T']:.2f} | {100 * start['sym mAP']:.2f} |")
    teachers = {round(v["teacher"], 6) for values in rows.values() for v in values}
    lines.append("")
    lines.append(f"teacher sym mAP (128 px): {', '.join(f'{100 * t:.2f}' for t in sorted(teachers))}; "
                 "± is the sample standard deviation over seeds")
    return "\n".join(lines)


def read_start():
    path = RUNS / "start.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    got = next(iter(data["datasets"].values()))
    return {"mAP": got["asym"]["mAP"], "R@1": got["asym"]["R@1"], "mAP/T": got["asym"]["mAP"] / got["teacher"]["mAP"],
            "sym mAP": got["sym"]["mAP"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="1234", help="comma-separated seeds; beyond the first, only for --top")
    parser.add_argument("--top", type=int, default=0, help="run the extra seeds for the N best configs of the first seed")
    parser.add_argument("--only", default="", help="comma-separated config names (default: all)")
    parser.add_argument("--budget-minutes", type=float, default=50.0, help="start no run after this much wall-clock time")
    parser.add_argument("--table-only", action="store_true", help="print the table of the finished runs")
    parser.add_argument("--tune", default="", help="comma-separated configs to tune with --optimize (first seed), "
                        "after the other runs; 'all' for every config")
    parser.add_argument("--trials", type=int, default=6, help="optuna trials of --tune")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    names = [n for n in configs() if not args.only or n in args.only.split(",")]
    tune = configs() if args.tune.strip() == "all" else [n for n in args.tune.split(",") if n.strip()]
    for option, given in (("--only", args.only.split(",")), ("--tune", tune)):
        unknown = set(filter(None, given)) - set(configs())
        if unknown:
            raise SystemExit(f"{option}: no config {sorted(unknown)} in {HERE}; choose from {configs()}")

    if not args.table_only:
        if not TEACHER.is_file():
            raise SystemExit(f"no teacher at {TEACHER}: run `python main.py` (the default) and copy its "
                             "runs/<run>/teacher/model_best.pth there")
        RUNS.mkdir(parents=True, exist_ok=True)
        started = time.time()
        if not INIT.is_file():
            make_student_init()
        test_start()
        budget = dict(started=started, minutes=args.budget_minutes)
        skipped = within_budget([(n, seeds[0]) for n in names], run_one, **budget)
        if args.top and len(seeds) > 1 and not skipped:
            first = collect(lambda n: seeds[:1], tuned=False)
            best = sorted((n for n in first if n in names), key=lambda n: -first[n][0]["mAP"])[: args.top]
            skipped = within_budget([(n, s) for s in seeds[1:] for n in best], run_one, **budget)
        plan = [(n, seeds[0]) for n in tune]
        untuned = plan if skipped else within_budget(plan, lambda n, s: tune_one(n, s, args.trials), **budget)
        skipped += [(f"{n} (tuned)", s) for n, s in untuned]
        if args.top and len(seeds) > 1 and tune and not skipped:  # the extra seeds for the N best tuned configs
            first = collect(lambda n: seeds[:1])
            best = sorted((n for n in tune if f"{n} (tuned)" in first),
                          key=lambda n: -first[f"{n} (tuned)"][0]["mAP"])[: args.top]
            plan = [(n, s) for s in seeds[1:] for n in best]
            skipped = [(f"{n} (tuned)", s) for n, s in
                       within_budget(plan, lambda n, s: rerun_tuned(n, s, seeds[0]), **budget)]
        if skipped:
            print(f">> budget of {args.budget_minutes:g} min spent; not run: "
                  + ", ".join(f"{n} (seed {s})" for n, s in skipped))
        print(f">> wall clock {(time.time() - started) / 60:.1f} min")
    print(table(collect(lambda n: seeds), read_start()))


if __name__ == "__main__":
    main()
