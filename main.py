#!/usr/bin/env python
"""Distillation training for resolution-asymmetric retrieval (Suma & Tolias, WACV 2023).

``python main.py`` with no argument runs the whole story on the embedded Fashion-MNIST subset: a
teacher trained at the high resolution, a student distilled at the low resolution (``ts_aug``), and
the final table (teacher, naive asymmetric baseline, student asymmetric and symmetric).
See ``python main.py --help`` and README.md.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from lib.cache import EmbeddingCache
from lib.checkpoint import load_checkpoint
from lib.models.loading import get_network, load_network
from lib.config import Config, load_config
from lib.data.splits import DatasetSplit, load_split, trainval
from lib.distributed import DistInfo, barrier, init_distributed, shutdown_distributed
from lib.evaluation.cost import format_cost_table, query_costs
from lib.evaluation.protocol import format_table
from lib.evaluation.run import check_test_datasets, cost_networks, dataset_specs, evaluate_dataset
from lib.logger import get_logger
from lib.trainer import TrainResult, Validator, check_learned_miners, train
from lib.utils import environment, run_script, seed_everything, select_device, write_json

CACHE_DIR = ".cache/embeddings"


def devices(cfg: Config, info: DistInfo) -> Tuple[torch.device, torch.device]:
    """The student's and the teacher's device (``--gpu-id 0,1`` puts the teacher on the second GPU)."""
    if cfg.gpu_id:
        ids = [int(i) for i in str(cfg.gpu_id).split(",") if i.strip()]
        student = torch.device(f"cuda:{ids[0]}")
        teacher = torch.device(f"cuda:{ids[1]}") if len(ids) > 1 else student
    else:
        student = select_device(cfg.device)
        if info.enabled and student.type == "cuda":
            student = torch.device(f"cuda:{info.local_rank}")
        teacher = student
    if cfg.teacher_device:
        teacher = torch.device(cfg.teacher_device)
    if student.type == "cuda":
        torch.cuda.set_device(student)
    return student, teacher


#: what a run directory holds once a run has trained something; a ``config.json`` alone is a start that
#: failed, and the same command may run there again
RUN_OUTPUTS = ("checkpoint_last.pth", "model_best.pth", "results.json", "teacher/checkpoint_last.pth",
               "teacher/model_best.pth", "study.db", "trials")

#: options a resumed run may change: where and how it runs, what it logs and tests; never what it trains
#: (``epochs`` may grow where the schedule does not depend on it, see :func:`check_resume`)
RESUME_MAY_CHANGE = ("directory", "workers", "device", "gpu_id", "teacher_device", "print_freq", "logger", "comment",
                     "data_root", "test_datasets", "val_freq", "save_freq", "student_init")
#: options that say how to start or search, not what this stage trains (a final run after a search is
#: compared with the values the search chose)
_NOT_COMPARED = ("resume_student", "overwrite", "optimize", "trials", "search", "storage", "study_name", "resume",
                 "pruner", "search_only")

#: the flags that set a field of the on-the-fly teacher stage's config (``get_teacher``)
TEACHER_FLAGS = {"epochs": "--teacher-epochs", "lr": "--teacher-lr", "batch_size": "--teacher-batch-size",
                 "neg_num": "--teacher-neg-num", "image_size": "--teacher-image-size"}


def holds_run(run_dir: Path) -> bool:
    return any((run_dir / name).exists() for name in RUN_OUTPUTS)


def resume_path(cfg: Config, run_dir: Path) -> Optional[Path]:
    """The checkpoint ``--resume-student`` names (``last``: ``<run_dir>/checkpoint_last.pth``), or None
    when ``last`` finds none because the run was stopped before its student stage (its teacher stage
    resumes by itself)."""
    if not cfg.resume_student:
        return None
    path = run_dir / "checkpoint_last.pth" if cfg.resume_student == "last" else Path(cfg.resume_student)
    if not path.is_file():
        if cfg.resume_student == "last" and (run_dir / "teacher" / "checkpoint_last.pth").is_file():
            return None
        raise FileNotFoundError(f"--resume-student {cfg.resume_student}: no checkpoint at {path}")
    return path


def check_resume(cfg: Config, path: Path, flags: Optional[Dict[str, str]] = None) -> None:
    """Refuse, before anything is written, to resume ``path`` with options that would train something
    else than the run that wrote it: the error names every flag that differs, with both values.

    ``epochs`` may grow with ``--scheduler exponential`` or ``none`` (the schedule does not depend on
    the run's length, so the resumed run is the longer run); with ``onecycle`` and ``cyclic`` the
    whole schedule is laid out over ``epochs``, so another value is refused. ``flags`` maps a field to
    the flag that sets it (the teacher stage's ``epochs`` is ``--teacher-epochs``)."""
    flags = flags or {}
    state = load_checkpoint(path)
    if "optimizer" not in state or not isinstance(state.get("config"), dict):
        kind = "a network checkpoint (weights and metadata only)" if "state_dict" in state else "not a checkpoint of main.py"
        raise ValueError(f"--resume-student {path}: this is {kind}, not a training checkpoint: resume from the "
                         f"checkpoint_last.pth of its run (model_best.pth only starts a new run, --student-path)")
    saved, current = state["config"], cfg.to_dict()
    done = int(state.get("epoch", 0))
    differ = []
    for name in sorted(set(saved) & set(current)):
        if name in RESUME_MAY_CHANGE or name in _NOT_COMPARED or saved[name] == current[name]:
            continue
        if name == "epochs" and cfg.scheduler in ("exponential", "none") and saved.get("scheduler") == cfg.scheduler \
                and current[name] >= done:
            continue
        differ.append(f"{flags.get(name, '--' + name.replace('_', '-'))} {current[name]!r} (checkpoint: {saved[name]!r})")
    if differ:
        extra = ""
        if any(d.startswith(("--epochs ", "--teacher-epochs ")) for d in differ):
            extra = (f"; the checkpoint is at epoch {done}: more epochs only with --scheduler exponential or none, as "
                     f"{cfg.scheduler}'s schedule is laid out over the number of epochs")
        raise ValueError(f"--resume-student {path}: this run's options differ from the checkpoint's: "
                         f"{', '.join(differ)}{extra}. Resume with the checkpoint's values (only "
                         f"{', '.join('--' + n.replace('_', '-') for n in RESUME_MAY_CHANGE)} may change), or start "
                         "a new run (another --directory, or --overwrite)")


def prepare_run_dir(cfg: Config, info: DistInfo) -> Path:
    """The run directory, checked before anything is written to it: a directory that holds a run is
    resumed (``--resume-student``, options checked against the checkpoint), joined (``--optimize
    --resume``) or moved aside (``--overwrite``: to ``<dir>.old-<time>``); otherwise it is an error."""
    if cfg.directory:
        run_dir = Path(cfg.directory)
    elif cfg.resume_student and Path(cfg.resume_student).is_file():
        run_dir = Path(cfg.resume_student).parent
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path("runs") / f"{Path(cfg.training_dataset).stem}-{cfg.mode}-{stamp}{('-' + cfg.comment) if cfg.comment else ''}"
    config_file = run_dir / "config.json"
    if info.is_main:
        resume = resume_path(cfg, run_dir)
        if resume is not None and not cfg.optimize:  # with --optimize: checked once the search has chosen
            check_resume(cfg, resume)
        if holds_run(run_dir) and not cfg.resume_student and not (cfg.optimize and cfg.resume):
            if not cfg.overwrite:
                raise FileExistsError(f"{run_dir} already holds a run ({', '.join(n for n in RUN_OUTPUTS if (run_dir / n).exists())}); "
                                      "resume it with --resume-student last, pick another --directory, or pass --overwrite")
            aside = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
            n = 1
            while aside.exists():
                n += 1
                aside = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
            run_dir.rename(aside)
            print(f">> --overwrite: the run that was in {run_dir} moved to {aside}")
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(cfg.to_dict(), config_file)
    barrier(info)
    return run_dir


def training_data(split: DatasetSplit, with_val: bool):
    """(paths, labels 0..C-1) of the training classes; train+val merged when ``with_val``."""
    source = split if not with_val else DatasetSplit(split.name, split.root, trainval(split.split))
    paths, labels = source.subset("train")
    if not paths:
        raise ValueError(f"dataset {split.name!r} has no training images")
    labels = torch.unique(torch.as_tensor(labels), return_inverse=True)[1]
    return paths, labels.tolist()


def run_stage(cfg: Config, run_dir: Path, split: DatasetSplit, teacher, *, device, teacher_device, info: DistInfo,
              cache: EmbeddingCache, trial=None, tag: str = "") -> TrainResult:
    """One training run: on train with validation on val, or (``--no-val``) on train+val."""
    seed_everything(cfg.seed)
    paths, labels = training_data(split, with_val=not cfg.val)
    validator = None
    if cfg.val and info.is_main:
        val_paths, val_labels = split.subset("val")
        if not val_paths:
            raise ValueError(f"dataset {split.name!r} has no validation classes: use --no-val or a larger --val-ratio")
        validator = Validator(cfg, val_paths, val_labels, teacher, device=device, teacher_device=teacher_device,
                              cache=cache, name=f"{split.name}-val")
    student = get_network(cfg.student, cfg.student_path, pooling=cfg.pool, whitening=cfg.whitening,
                          pretrained=cfg.pretrained, weights=cfg.weights, image_size=cfg.image_size)
    resume = resume_path(cfg, run_dir)
    if resume is not None:
        check_resume(cfg, resume, flags=TEACHER_FLAGS if tag.startswith("teacher") else None)
    elif cfg.resume_student and info.is_main:
        print(f">> {tag or 'student '}stage: no checkpoint of it in {run_dir} yet, it starts from the beginning")
    logger = get_logger(cfg.logger, str(run_dir / "tensorboard"), enabled=info.is_main)
    logger.text("config", "```\n" + json.dumps(cfg.to_dict(), indent=2) + "\n```")
    try:
        result = train(cfg, run_dir, student, teacher, paths, labels, validator=validator, device=device,
                       teacher_device=teacher_device, logger=logger, cache=cache, dist_info=info, trial=trial,
                       resume=str(resume) if resume else None, tag=tag)
        final = {k: v for k, v in result.history[-1].items() if k.startswith("val/")} if result.history else {}
        logger.hparams({k: v for k, v in cfg.to_dict().items() if k != "objective"} | {"objective": ",".join(cfg.objective)},
                       final or {"train/loss": result.history[-1]["train/loss"]})
    finally:
        logger.close()
    return result


def get_teacher(cfg: Config, split: DatasetSplit, run_dir: Path, **kw):
    """``--teacher-path`` (a checkpoint), ``--teacher`` (ImageNet weights as they are), or, in a teacher
    mode without either, a teacher trained here first in ``sym`` mode at the teacher's resolution."""
    if cfg.teacher_path or cfg.teacher:
        return get_network(cfg.teacher, cfg.teacher_path, pooling=cfg.pool, whitening=cfg.whitening,
                           pretrained=cfg.pretrained, weights=cfg.weights, image_size=cfg.teacher_image_size)
    if cfg.mode == "sym" or not cfg.train_teacher:
        if cfg.mode != "sym":
            raise ValueError(f"mode {cfg.mode!r} needs --teacher, --teacher-path or --train-teacher")
        return None
    teacher_dir = run_dir / "teacher"
    per_class = cfg.samples_per_class or 4
    # as many classes per batch as --teacher-batch-size holds, at most as many as there are to train on
    num_classes = len(set(training_data(split, with_val=not cfg.val)[1]))
    batch_size = max(1, min(cfg.teacher_batch_size // per_class, num_classes)) * per_class
    tcfg = cfg.replace(mode="sym", image_size=cfg.teacher_image_size, epochs=cfg.teacher_epochs, lr=cfg.teacher_lr,
                       objective=[], student_path=None, directory=str(teacher_dir), batch_size=batch_size,
                       samples_per_class=per_class, neg_num=cfg.teacher_neg_num, resume_student=None, optimize=False,
                       student_init="auto")
    best = teacher_dir / "model_best.pth"
    last = teacher_dir / "checkpoint_last.pth"
    if last.is_file():  # a teacher stage of this run already started: same options, or a clear error
        check_resume(tcfg, last, flags=TEACHER_FLAGS)
    if last.is_file() and load_checkpoint(last).get("epoch") == tcfg.epochs:
        print(f">> reusing the finished teacher {best}")
    else:
        if last.is_file():
            tcfg = tcfg.replace(resume_student=str(last))
        teacher_dir.mkdir(parents=True, exist_ok=True)
        write_json(tcfg.to_dict(), teacher_dir / "config.json")
        print(f">> training the teacher: {tcfg.student} at {tcfg.image_size}px, mode sym, {tcfg.epochs} epochs")
        run_stage(tcfg, teacher_dir, split, None, tag="teacher ", **kw)
    return load_network(str(best))


def final_test(cfg: Config, student_path: Path, teacher, *, device, run_dir: Path, cache: EmbeddingCache) -> Dict:
    """The result table on each test dataset (``lib.evaluation.run``, the evaluation test.py runs): teacher
    (symmetric, high resolution), the naive asymmetric baseline (teacher on low-resolution queries against
    its high-resolution database), the student asymmetric (against the teacher's database) and symmetric."""
    student = load_network(str(student_path)).to(device)
    results = {}
    # each row's query network: params, GFLOPs, CPU ms
    costs = query_costs(cost_networks(student, teacher, cfg.image_size, cfg.teacher_image_size))
    for spec in dataset_specs(cfg.test_datasets):
        evaluation = evaluate_dataset(spec, student, teacher, image_size=cfg.image_size,
                                      teacher_size=cfg.teacher_image_size, data_root=cfg.data_root,
                                      val_ratio=cfg.val_ratio, cache=cache, device=device, workers=cfg.workers,
                                      costs=costs)
        results[spec] = rows = evaluation.rows()
        print()
        print(format_table(rows, title=spec))
        print(format_cost_table(rows, title="query-side cost (1 thread CPU, batch 1)"))
    return results


def main(argv=None) -> Dict:
    cfg = load_config(argv)
    info = init_distributed(select_device(cfg.device).type if not cfg.gpu_id else "cuda")
    result = run(cfg, info)
    shutdown_distributed(info)  # on success only: after an error, torchrun stops the other processes
    return result


def run(cfg: Config, info: DistInfo) -> Dict:
    check_learned_miners(cfg)  # before the run directory, the teacher and the search
    device, teacher_device = devices(cfg, info)
    # the datasets before the run directory: a misspelt name leaves nothing behind, and a bad test
    # dataset is reported now, not after the training
    try:
        split = load_split(cfg.training_dataset, cfg.data_root, val_ratio=cfg.val_ratio)
    except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"--training-dataset {cfg.training_dataset!r}: {e}") from None
    check_test_datasets(cfg.test_datasets, "--test-datasets", data_root=cfg.data_root, val_ratio=cfg.val_ratio)
    run_dir = prepare_run_dir(cfg, info)
    if info.is_main:
        print(f">> run directory {run_dir} (device {device}{', teacher on ' + str(teacher_device) if teacher_device != device else ''}"
              f"{f', {info.world_size} processes' if info.enabled else ''})")
    cache = EmbeddingCache(CACHE_DIR)
    kw = dict(device=device, teacher_device=teacher_device, info=info, cache=cache)
    teacher = get_teacher(cfg, split, run_dir, **kw)

    if cfg.optimize:
        from lib.hpo import optimize

        best = optimize(cfg, run_dir, split, teacher, run_stage=run_stage, **kw)
        cfg = cfg.replace(**best)
        if info.is_main:
            print(f">> best hyper-parameters on validation: {best}")
            write_json(cfg.to_dict(), run_dir / "config_final.json")
        if cfg.search_only:
            return {"run_dir": str(run_dir), "best": best}

    result = run_stage(cfg, run_dir, split, teacher, **kw)
    if not info.is_main:
        return {}
    results = {"run_dir": str(run_dir), "environment": environment(),
               "best_epoch": result.best_epoch, "best_val_score": result.best_score,
               "test": final_test(cfg, result.best_path, teacher, device=device, run_dir=run_dir, cache=cache)}
    write_json(results, run_dir / "results.json")
    print(f"\n>> results written to {run_dir / 'results.json'}")
    return results


if __name__ == "__main__":
    run_script(main, "main.py")
