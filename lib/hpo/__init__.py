"""Hyper-parameter search with optuna on the class-disjoint validation split.

The paper's protocol (Suma & Tolias, WACV 2023, Sec. 4; ANCHORS.md Sec. 1): maximise the validation
mAP (asymmetric when there is a teacher) over lr in [1e-4, 2e-4] (log), lam-1 and lam-2 in [0.6, 0.8];
the first trial is the configured values; 6 trials; no pruning; the final run then trains on train+val
with the best values and no validation. Everything of it is a default here, not a constant:

* the search space is declared (``--search PARAM=LOW:HIGH[:log][:int]``, repeatable, or a YAML mapping
  ``search: {lr: [1e-4, 2e-4, log]}``); a declared parameter is added to the default space or replaces
  its range, ``PARAM=off`` drops it. PARAM is a numeric Config field (``lr``, ``weight_decay``,
  ``pos_num``...) or ``objective.<name or index>.<key>`` / ``objective.<name>.weight`` for a parameter
  or the weight of an ``--objective`` spec;
* the study lives in an RDB storage (SQLite ``<run_dir>/study.db`` by default, any SQLAlchemy URL with
  ``--storage``), so a killed search continues with ``--resume`` and several processes or machines
  that name the same storage and ``--study-name`` share one search;
* ``--pruner median|hyperband`` stops poor trials on the validation mAP of each validation epoch.

``--trials N`` is the number of *finished* trials (complete or pruned) the study must hold: a resumed
search runs only the missing ones; failed trials (an exception, a NaN loss) are recorded as FAIL and
replaced; a trial left RUNNING by a killed process is marked FAIL and retried with the same values.

optuna is imported inside ``lib.hpo`` only: the rest of the toolkit runs without it.

The package, one concern per module: ``space`` (the search-space grammar and values -> Config),
``storage`` (RDB storage, pruner, sampler), ``liveness`` (dead workers' trials), ``ddp`` (the torchrun
protocol), ``reports`` (summary files and plots); the search loop itself is here.
"""
from __future__ import annotations

import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict

from lib.hpo.ddp import _broadcast, _ReportOnly
from lib.hpo.liveness import _counts, _worker, fail_dead_trials
from lib.hpo.reports import trial_rows, write_summary
from lib.hpo.space import (MODE_WEIGHTS, PAPER_SPACE, SearchParam, config_changes, current_value,
                           format_objective_spec, parse_search, search_space, trial_config)
from lib.hpo.storage import (GRACE_S, HEARTBEAT_S, MAX_RETRIES, PRUNERS, make_pruner, make_sampler, make_storage,
                             retry_trial, storage_url, study_name)
from lib.config import Config
from lib.utils import write_json

POLL_S = 10.0        # how often a worker whose remaining trials run elsewhere checks on them


def optimize(cfg: Config, run_dir, split, teacher, *, run_stage: Callable, device, teacher_device, info, cache,
             sampler=None, pruner=None) -> Dict[str, Any]:
    """Run (or continue, or join) the study; return the best values as Config changes for the final
    run, with ``val=False``: the paper's final run trains on train+val without validation.

    Each trial is ``run_stage(trial_cfg, run_dir/trials/<number>, split, teacher, trial=trial, ...)``
    and its objective is the returned ``best_score`` (the best validation mAP over its epochs).
    Writes ``study_trials.csv``, ``study_summary.md``, ``study_best.json`` and optuna's plots to
    ``run_dir``. ``sampler``/``pruner`` override the configured ones (tests, notebooks).
    """
    run_dir = Path(run_dir)
    space = search_space(cfg)  # fail early, on every rank
    if cfg.trials < 1:
        raise ValueError(f"--trials must be >= 1, got {cfg.trials}")
    stage_kw = dict(device=device, teacher_device=teacher_device, info=info, cache=cache)
    if not info.is_main:
        return _follow(cfg, run_dir, split, teacher, run_stage=run_stage, stage_kw=stage_kw, device=device, info=info)
    try:
        best = _lead(cfg, run_dir, split, teacher, space, run_stage=run_stage, stage_kw=stage_kw,
                     sampler=sampler, pruner=pruner)
    except BaseException as err:
        if info.enabled:
            _broadcast(("abort", f"{type(err).__name__}: {err}"), info, device)
        raise
    if info.enabled:
        _broadcast(("done", best), info, device)
    return best


def _follow(cfg, run_dir, split, teacher, *, run_stage, stage_kw, device, info):
    while True:
        kind, payload = _broadcast(None, info, device)
        if kind == "done":
            return payload
        if kind == "abort":
            raise RuntimeError(f"the search stopped on rank 0: {payload}")
        number, params = payload
        trial_dir = run_dir / "trials" / str(number)
        try:
            run_stage(trial_config(cfg, trial_dir, params), trial_dir, split, teacher, trial=None,
                      tag=f"trial {number} ", **stage_kw)
        except Exception as err:  # the same failure is recorded by rank 0
            print(f">> rank {info.rank}: trial {number} failed: {type(err).__name__}: {err}", file=sys.stderr)


def _lead(cfg, run_dir, split, teacher, space, *, run_stage, stage_kw, sampler, pruner):
    import optuna
    from optuna.trial import TrialState

    info, device = stage_kw["info"], stage_kw["device"]
    url, name = storage_url(cfg, run_dir), study_name(cfg, run_dir)
    pruner_name = getattr(cfg, "pruner", "none")
    if pruner is None:
        pruner = make_pruner(pruner_name, epochs=cfg.epochs)
    if info.enabled and pruner_name != "none":
        print(">> --pruner is off under torchrun: trials report their validation mAP but run to the end")
    run_dir.mkdir(parents=True, exist_ok=True)
    storage = make_storage(url)
    initial = {p.name: current_value(cfg, p.name) for p in space}
    for p in space:
        if not p.contains(initial[p.name]):
            print(f">> {p.name}={initial.pop(p.name)!r} is not in its search range: the first trial samples it")
    try:
        study = optuna.create_study(storage=storage, study_name=name, direction="maximize",
                                    sampler=make_sampler(cfg.seed, initial, base=sampler), pruner=pruner,
                                    load_if_exists=bool(getattr(cfg, "resume", False)))
    except optuna.exceptions.DuplicatedStudyError:
        raise ValueError(f"the study {name!r} already exists in {url}: pass --resume to continue it (or to join "
                         "it from another process), or pick another --study-name / --directory") from None
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise ValueError(f"the study {name!r} in {url} minimises; this search maximises the validation mAP")

    fail_dead_trials(study)
    counts = _counts(study)
    done = counts["COMPLETE"] + counts["PRUNED"]
    print(f">> optuna study {name!r} in {url}: {done}/{cfg.trials} trials finished"
          + (f", {counts['RUNNING']} running" if counts["RUNNING"] else "") + "; searching "
          + "; ".join(str(p) for p in space))

    def objective(trial):
        trial.set_user_attr("worker", _worker())
        if trial.number == 0 and initial:
            trial.set_user_attr("initial", True)
        ahead = [t for t in study.get_trials(deepcopy=False)
                 if t.number < trial.number and t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING,
                                                            TrialState.WAITING)]
        if len(ahead) >= cfg.trials:  # another worker took the last trial meanwhile
            trial.set_user_attr("surplus", True)
            raise _Surplus(f"trial {trial.number} is beyond --trials {cfg.trials}")
        params = {p.name: p.suggest(trial) for p in space}
        trial_dir = run_dir / "trials" / str(trial.number)
        trial_dir.mkdir(parents=True, exist_ok=True)
        tcfg = trial_config(cfg, trial_dir, params)
        write_json({"study": name, "trial": trial.number, "params": params, "config": tcfg.to_dict()},
                   trial_dir / "trial.json")
        print(f"\n>> trial {trial.number}: " + ", ".join(f"{k}={v:.6g}" for k, v in params.items()))
        if info.enabled:
            _broadcast(("trial", (trial.number, params)), info, device)
        try:
            result = run_stage(tcfg, trial_dir, split, teacher, trial=_ReportOnly(trial) if info.enabled else trial,
                               tag=f"trial {trial.number} ", **stage_kw)
        except optuna.TrialPruned:
            print(f">> trial {trial.number} pruned")
            raise
        except Exception as err:
            trial.set_user_attr("error", f"{type(err).__name__}: {err}"[:2000])
            (trial_dir / "error.txt").write_text(traceback.format_exc())
            print(f">> trial {trial.number} failed: {type(err).__name__}: {err}", file=sys.stderr)
            raise
        score = result.best_score
        if score is None or not math.isfinite(score):
            trial.set_user_attr("error", f"no finite validation score ({score})")
            raise ValueError(f"trial {trial.number}: no finite validation score ({score})")
        trial.set_user_attr("best_epoch", result.best_epoch)
        return float(score)

    def after_trial(study_, frozen):
        write_summary(study_, run_dir, space=space, plots=False)

    while True:
        fail_dead_trials(study)
        counts = _counts(study)
        done = counts["COMPLETE"] + counts["PRUNED"]
        if done >= cfg.trials:
            break
        if counts["errors"] >= max(cfg.trials, 2):
            print(f">> stopping the search: {counts['errors']} trials failed (see {run_dir / 'trials'}/*/error.txt)",
                  file=sys.stderr)
            break
        if done + counts["RUNNING"] >= cfg.trials:  # the last trials run in other processes: wait for them
            if info.enabled:  # (not under torchrun: the other ranks would time out waiting)
                break
            time.sleep(POLL_S)
            continue
        study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=[after_trial], gc_after_trial=True)

    summary = write_summary(study, run_dir, space=space, plots=True)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise RuntimeError(f"no trial of the study {name!r} completed ({summary['counts']}); "
                           f"see {run_dir / 'study_summary.md'} and {run_dir / 'trials'}/*/error.txt")
    best = study.best_trial
    changes = {**config_changes(cfg, best.params), "val": False}
    write_json({"study": name, "storage": url, "trial": best.number, "value": best.value, "params": best.params,
                "config": changes}, run_dir / "study_best.json")
    print(f">> best trial {best.number}: validation mAP {100 * best.value:.2f} with "
          + ", ".join(f"{k}={v:.6g}" for k, v in best.params.items()))
    return changes


class _Surplus(RuntimeError):
    pass



__all__ = ["SearchParam", "PAPER_SPACE", "MODE_WEIGHTS", "PRUNERS", "HEARTBEAT_S", "GRACE_S", "MAX_RETRIES",
           "parse_search", "search_space", "config_changes", "current_value", "format_objective_spec", "trial_config",
           "storage_url", "study_name", "make_storage", "make_pruner", "make_sampler", "fail_dead_trials", "retry_trial",
           "write_summary", "trial_rows", "optimize"]
