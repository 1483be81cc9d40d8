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

optuna is imported here only: the rest of the toolkit runs without it.
"""
from __future__ import annotations

import csv
import dataclasses
import inspect
import math
import os
import socket
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Union

from lib.config import Config
from lib.losses.base import ObjectiveSpec, parse_objective_spec
from lib.utils import write_json

#: the paper's search space, per training mode (its HPO tuned ``ts_aug``; the others get its lr range)
PAPER_SPACE: Dict[str, Sequence[str]] = {
    "ts_aug": ("lr=1e-4:2e-4:log", "lam_1=0.6:0.8", "lam_2=0.6:0.8"),
    "ts_reg": ("lr=1e-4:2e-4:log",),
    "sym": ("lr=1e-4:2e-4:log",),
}
PRUNERS = ("none", "median", "hyperband")
HEARTBEAT_S = 60     # a RUNNING trial whose process stopped beating for GRACE_S is failed and retried
GRACE_S = 180
POLL_S = 10.0        # how often a worker whose remaining trials run elsewhere checks on them
MAX_RETRIES = 2      # re-runs of a trial killed with its process
_OFF = ("off", "none", "false", "no")


# ---------------------------------------------------------------------------------------------------
# search space
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SearchParam:
    """One searched hyper-parameter and its range.

    ``name`` is a Config field (``lr``) or ``objective.<name or index>.<key>`` (``weight`` as key for the
    objective's weight); ``integer`` suggests integers (int Config fields are integer automatically).
    """

    name: str
    low: float
    high: float
    log: bool = False
    integer: bool = False

    def suggest(self, trial) -> Union[int, float]:
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)

    def contains(self, value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and self.low <= value <= self.high

    def __str__(self) -> str:
        kind = ", log" if self.log else ""
        kind += ", int" if self.integer else ""
        return f"{self.name} in [{self.low:g}, {self.high:g}{kind}]"


def _number(text: Any, where: str) -> float:
    if isinstance(text, bool):
        raise ValueError(f"{where}: {text!r} is not a number")
    try:
        return float(text)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {text!r} is not a number") from None


def _normalize_name(name: str) -> str:
    name = str(name).strip()
    if name.startswith("objective."):
        head, _, key = name.rpartition(".")
        return f"{head}.{key.replace('-', '_')}"
    return name.replace("-", "_")


def _range_from(name: str, value: Any, where: str) -> Optional[SearchParam]:
    """``'1e-4:2e-4:log'``, ``[1e-4, 2e-4, 'log']``, ``{low:, high:, log:, int:}`` or off -> SearchParam/None."""
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() in _OFF):
        return None
    if isinstance(value, Mapping):
        unknown = set(value) - {"low", "high", "log", "int"}
        if unknown or not {"low", "high"} <= set(value):
            raise ValueError(f"{where}: {name}: expected keys low, high[, log, int], got {sorted(value)}")
        low, high = _number(value["low"], f"{where}: {name}"), _number(value["high"], f"{where}: {name}")
        flags = ["log"] * bool(value.get("log")) + ["int"] * bool(value.get("int"))
    else:
        parts = [p.strip() for p in value.split(":")] if isinstance(value, str) else list(value)
        if len(parts) < 2:
            raise ValueError(f"{where}: {name}={value!r}: expected LOW:HIGH[:log][:int]")
        low, high = _number(parts[0], f"{where}: {name}"), _number(parts[1], f"{where}: {name}")
        flags = [str(p).strip().lower() for p in parts[2:]]
        bad = [f for f in flags if f not in ("log", "int", "linear", "float")]
        if bad:
            raise ValueError(f"{where}: {name}={value!r}: unknown flag(s) {bad}; use log and/or int")
    if not low < high:
        raise ValueError(f"{where}: {name}: low {low:g} must be below high {high:g}")
    if "log" in flags and low <= 0:
        raise ValueError(f"{where}: {name}: a log range needs low > 0, got {low:g}")
    return SearchParam(name, low, high, log="log" in flags, integer="int" in flags)


def parse_search(entries: Union[None, str, Mapping, Iterable]) -> Dict[str, Optional[SearchParam]]:
    """Search entries (CLI strings ``PARAM=LOW:HIGH[:log][:int]`` / ``PARAM=off``, or YAML mappings) ->
    {name: SearchParam, or None for a dropped parameter}, in the order given."""
    out: Dict[str, Optional[SearchParam]] = {}
    if entries is None:
        return out
    if isinstance(entries, (str, Mapping)):
        entries = [entries]
    for entry in entries:
        if isinstance(entry, Mapping):
            items = list(entry.items())
        elif isinstance(entry, str):
            name, sep, value = entry.partition("=")
            if not sep or not name.strip():
                raise ValueError(f"--search {entry!r}: expected PARAM=LOW:HIGH[:log][:int] or PARAM=off")
            items = [(name, value)]
        else:
            raise ValueError(f"--search: cannot read {entry!r}; expected PARAM=LOW:HIGH[:log] or a mapping")
        for name, value in items:
            name = _normalize_name(name)
            out[name] = _range_from(name, value, "--search")
    return out


def _numeric_fields() -> Dict[str, type]:
    out = {}
    for f in dataclasses.fields(Config):
        default = f.default if f.default is not dataclasses.MISSING else None
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            out[f.name] = type(default)
    return out


def search_space(cfg: Config) -> List[SearchParam]:
    """The paper's space for ``cfg.mode`` merged with ``cfg.search``, checked against the Config and
    the ``--objective`` specs (an unknown name fails listing the valid ones)."""
    merged: Dict[str, Optional[SearchParam]] = dict(parse_search(PAPER_SPACE.get(cfg.mode, PAPER_SPACE["sym"])))
    merged.update(parse_search(getattr(cfg, "search", None)))
    numeric = _numeric_fields()
    space = []
    for name, param in merged.items():
        if param is None:
            continue
        if name.startswith("objective."):
            _, key = _resolve_objective(cfg.objective, name)
            if key != "weight":
                _check_objective_key(cfg.objective, name)
        elif name not in numeric:
            raise ValueError(f"--search {name}: not a numeric option; searchable: {sorted(numeric)} "
                             "or objective.<name>.<parameter> / objective.<name>.weight")
        elif numeric[name] is int:
            if param.low != int(param.low) or param.high != int(param.high):
                raise ValueError(f"--search {name}: an integer option needs integer bounds, got {param.low:g}:{param.high:g}")
            param = dataclasses.replace(param, integer=True)
        space.append(param)
    if not space:
        raise ValueError("--search: the search space is empty (every parameter is off)")
    _check_mode_weights(cfg, [p.name for p in space])
    return space


#: Config fields that are the weight of one of a mode's own objectives (``lib.modes``: ``base_objectives``)
MODE_WEIGHTS = {"ts_aug": {"lam_1": "relative_st", "lam_2": "relative_ss", "lam_label": "ms"}}


def _check_mode_weights(cfg: Config, names: Sequence[str]) -> None:
    """Refuse to search a mode weight (``lam_1``) whose objective an ``--objective`` spec replaces
    (``relative_st:W``): the searched value would never reach the loss."""
    user = {parse_objective_spec(s).name for s in cfg.objective}
    for field_name, objective in MODE_WEIGHTS.get(cfg.mode, {}).items():
        if field_name in names and objective in user:
            raise ValueError(
                f"--optimize searches {field_name} (the weight of {objective!r} in mode {cfg.mode}), but "
                f"--objective {objective}:... sets that objective itself, so {field_name} would never reach the loss; "
                f"search its weight as --search objective.{objective}.weight=LOW:HIGH with --search {field_name}=off, "
                f"or drop {objective} from --objective")


# ---------------------------------------------------------------------------------------------------
# values <-> Config
# ---------------------------------------------------------------------------------------------------
def _resolve_objective(objectives: Sequence, name: str):
    """``objective.<ref>.<key>`` -> (index into ``objectives``, key)."""
    parts = name.split(".")
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise ValueError(f"--search {name}: expected objective.<name or index>.<parameter>")
    ref, key = parts[1], parts[2]
    specs = [parse_objective_spec(o) for o in objectives]
    if ref.isdigit():
        index = int(ref)
        if index >= len(specs):
            raise ValueError(f"--search {name}: there are {len(specs)} --objective spec(s): "
                             f"{[s.name for s in specs]}")
        return index, key
    matches = [i for i, s in enumerate(specs) if s.name == ref]
    if not matches:
        raise ValueError(f"--search {name}: no --objective named {ref!r}; the run has {[s.name for s in specs]} "
                         "(add it with --objective NAME[:WEIGHT])")
    if len(matches) > 1:
        raise ValueError(f"--search {name}: {len(matches)} objectives are named {ref!r}; use its index, "
                         f"objective.{matches[0]}.{key}")
    return matches[0], key


def _objective_signature(spec: ObjectiveSpec):
    from lib.losses import OBJECTIVES

    return inspect.signature(OBJECTIVES.get_class(spec.name).__init__)


def _check_objective_key(objectives: Sequence, name: str) -> None:
    index, key = _resolve_objective(objectives, name)
    spec = parse_objective_spec(objectives[index])
    params = _objective_signature(spec).parameters
    if key not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        valid = sorted(k for k in params if k not in ("self", "embedding_dim", "num_classes"))
        raise ValueError(f"--search {name}: objective {spec.name!r} has no parameter {key!r}; valid: {valid} or weight")


def current_value(cfg: Config, name: str):
    """The configured value of a searched parameter (an objective's constructor default when unset)."""
    if not name.startswith("objective."):
        return getattr(cfg, name)
    index, key = _resolve_objective(cfg.objective, name)
    spec = parse_objective_spec(cfg.objective[index])
    if key == "weight":
        return spec.weight
    if key in spec.params:
        return spec.params[key]
    param = _objective_signature(spec).parameters.get(key)
    return None if param is None or param.default is inspect.Parameter.empty else param.default


def format_objective_spec(spec: ObjectiveSpec) -> str:
    """ObjectiveSpec -> ``name:weight[:k=v,...]`` (the inverse of ``parse_objective_spec``)."""
    text = f"{spec.name}:{spec.weight!r}"
    if spec.params:
        text += ":" + ",".join(f"{k}={v!r}" if not isinstance(v, str) else f"{k}={v}" for k, v in spec.params.items())
    return text


def _write_spec(original, spec: ObjectiveSpec):
    """A spec in the form of ``original`` (a string when it round-trips, else a mapping)."""
    if isinstance(original, str):
        text = format_objective_spec(spec)
        try:
            if parse_objective_spec(text) == spec:
                return text
        except ValueError:
            pass
    return {"name": spec.name, "weight": spec.weight, **spec.params}


def config_changes(cfg: Config, params: Mapping[str, Any]) -> Dict[str, Any]:
    """Searched values -> ``Config.replace`` keyword arguments (objective values rewrite the
    ``objective`` spec strings, e.g. ``objective.multisimilarity.alpha=3`` -> ``'multisimilarity:1.0:alpha=3'``)."""
    changes: Dict[str, Any] = {}
    objectives = list(cfg.objective)
    touched = False
    for name, value in params.items():
        if name.startswith("objective."):
            index, key = _resolve_objective(objectives, name)
            spec = parse_objective_spec(objectives[index])
            spec = ObjectiveSpec(spec.name, float(value) if key == "weight" else spec.weight,
                                 {**spec.params, **({} if key == "weight" else {key: value})})
            objectives[index] = _write_spec(objectives[index], spec)
            touched = True
        else:
            changes[name] = value
    if touched:
        changes["objective"] = objectives
    return changes


# ---------------------------------------------------------------------------------------------------
# optuna pieces
# ---------------------------------------------------------------------------------------------------
def storage_url(cfg: Config, run_dir: Path) -> str:
    """``--storage`` as an SQLAlchemy URL (a bare path is an SQLite file); default ``<run_dir>/study.db``."""
    url = getattr(cfg, "storage", None)
    if not url:
        return f"sqlite:///{Path(run_dir).resolve() / 'study.db'}"
    if "://" not in url:
        return f"sqlite:///{Path(url).expanduser().resolve()}"
    return url


def study_name(cfg: Config, run_dir: Path) -> str:
    return getattr(cfg, "study_name", None) or Path(run_dir).resolve().name


def make_storage(url: str, *, heartbeat: bool = True):
    """An RDB storage; with ``heartbeat`` a trial whose process died is failed after GRACE_S seconds
    and retried (up to MAX_RETRIES times) with the same values."""
    import optuna

    engine_kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
    kwargs: Dict[str, Any] = {}
    if heartbeat:
        callback_arg = ("heartbeat_stale_trial_callback"
                        if "heartbeat_stale_trial_callback" in inspect.signature(optuna.storages.RDBStorage).parameters
                        else "failed_trial_callback")
        kwargs = dict(heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S, **{callback_arg: retry_trial})
    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # heartbeat_interval is 'experimental'
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
        except Exception as err:  # workers starting together race to create the tables of a new database
            if attempt == 4 or not type(err).__module__.startswith("sqlalchemy"):
                raise
            time.sleep(0.5 * (attempt + 1))


def make_pruner(name: str, *, epochs: int):
    """``none`` (the paper), ``median`` (prune below the median of earlier trials at the same epoch,
    after 2 finished trials and from the 2nd epoch on) or ``hyperband`` over 1..epochs."""
    import optuna

    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, epochs), reduction_factor=3)
    raise ValueError(f"--pruner {name!r}: choose one of {list(PRUNERS)}")


def make_sampler(seed: int, initial: Optional[Mapping[str, Any]] = None, base=None):
    """The study's sampler: trial 0 takes the ``initial`` (configured) values, later trials come from
    ``base`` or, by default, TPE with a random state derived from (seed, trial number).

    Trial numbers are handed out atomically by the storage, so exactly one trial of a study is the
    configured one, however many workers start at once, and a resumed study never repeats it. With
    the per-trial seed a suggestion depends on the seed, the trial number and the finished history
    only: a resumed search proposes what an uninterrupted one would, and workers sharing a study do
    not draw the same random values (as workers with one equally seeded TPESampler each would).
    """
    import numpy as np
    import optuna

    initial = dict(initial or {})

    class TrialSeededSampler(optuna.samplers.BaseSampler):
        def __init__(self):
            self._number, self._sampler = None, None

        def _base(self, trial):
            if base is not None:
                return base
            if trial.number != self._number:
                state = int(np.random.SeedSequence([int(seed) % 2**32, trial.number]).generate_state(1)[0])
                self._number, self._sampler = trial.number, optuna.samplers.TPESampler(seed=state)
            return self._sampler

        def infer_relative_search_space(self, study, trial):
            return self._base(trial).infer_relative_search_space(study, trial)

        def sample_relative(self, study, trial, search_space):
            values = self._base(trial).sample_relative(study, trial, search_space)
            return {k: v for k, v in values.items() if not (trial.number == 0 and k in initial)}

        def sample_independent(self, study, trial, param_name, param_distribution):
            if trial.number == 0 and param_name in initial:
                return initial[param_name]
            return self._base(trial).sample_independent(study, trial, param_name, param_distribution)

        def before_trial(self, study, trial):
            self._base(trial).before_trial(study, trial)

        def after_trial(self, study, trial, state, values):
            self._base(trial).after_trial(study, trial, state, values)

        def reseed_rng(self):
            if base is not None:
                base.reseed_rng()

    return TrialSeededSampler()


def retry_trial(study, trial) -> None:
    """Re-queue a trial that died with its process (same values), at most MAX_RETRIES times."""
    origin = trial.user_attrs.get("retry_of", trial.number)
    attempt = int(trial.user_attrs.get("attempt", 0)) + 1
    if attempt > MAX_RETRIES or not trial.params:
        return
    study.enqueue_trial(dict(trial.params), user_attrs={"retry_of": origin, "attempt": attempt})


def _worker() -> Dict[str, Any]:
    """This process: host, boot and pid-namespace identity (so that liveness is only judged for
    processes this machine can see), and pid."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    return {"machine": f"{socket.gethostname()}/{boot}/{namespace}", "pid": os.getpid()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child its parent has not waited for yet is a zombie: dead
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def fail_dead_trials(study) -> List[int]:
    """Mark FAIL (and retry) the RUNNING trials of dead processes: at once for processes of this
    machine, after the heartbeat grace period for the others (optuna's ``fail_stale_trials``)."""
    import optuna
    from optuna.trial import TrialState

    me = _worker()
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get("worker") or {}
        if owner.get("machine") == me["machine"] and owner.get("pid") != me["pid"] and not _alive(int(owner["pid"])):
            try:
                study.tell(trial.number, state=TrialState.FAIL)
            except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError, ValueError):
                continue  # finished meanwhile, or failed by another worker
            failed.append(trial.number)
            retry_trial(study, next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optuna.storages.fail_stale_trials(study)
    return failed


def _counts(study) -> Dict[str, int]:
    from optuna.trial import TrialState

    counts = {state.name: 0 for state in TrialState}
    counts["errors"] = 0
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] += 1
        if trial.state == TrialState.FAIL and "error" in trial.user_attrs:
            counts["errors"] += 1
    return counts


# ---------------------------------------------------------------------------------------------------
# DDP: rank 0 runs the study, the other ranks train the same trials
# ---------------------------------------------------------------------------------------------------
def _broadcast(message, info, device):
    import torch
    import torch.distributed as dist

    box = [message]
    kwargs = {"device": device} if device is not None and torch.device(device).type == "cuda" else {}
    dist.broadcast_object_list(box, src=0, **kwargs)
    return box[0]


class _ReportOnly:
    """Under torchrun the ranks cannot agree on a mid-run prune: report, never prune."""

    def __init__(self, trial):
        self.trial = trial

    def report(self, value, step):
        if value is not None:
            self.trial.report(value, step)

    def should_prune(self) -> bool:
        return False


# ---------------------------------------------------------------------------------------------------
# the search
# ---------------------------------------------------------------------------------------------------
def trial_config(cfg: Config, trial_dir: Path, params: Mapping[str, Any]) -> Config:
    """The configuration of one trial: the searched values, validation on, its own directory."""
    return cfg.replace(**config_changes(cfg, params), val=True, directory=str(trial_dir), resume_student=None,
                       optimize=False)


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


# ---------------------------------------------------------------------------------------------------
# summary and plots
# ---------------------------------------------------------------------------------------------------
def trial_rows(study, space: Sequence[SearchParam] = ()) -> List[Dict[str, Any]]:
    """One flat row per trial (number, state, value, params, durations, notes)."""
    names = [p.name for p in space]
    for trial in study.get_trials(deepcopy=False):
        names += [n for n in trial.params if n not in names]
    rows = []
    for t in study.get_trials(deepcopy=False):
        duration = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
        notes = []
        if t.user_attrs.get("initial"):
            notes.append("configured values")
        if "retry_of" in t.user_attrs:
            notes.append(f"retry of {t.user_attrs['retry_of']}")
        if t.user_attrs.get("surplus"):
            notes.append("surplus (beyond --trials)")
        if "error" in t.user_attrs:
            notes.append(t.user_attrs["error"])
        steps = sorted(t.intermediate_values)
        rows.append({"number": t.number, "state": t.state.name, "value": t.value,
                     **{n: t.params.get(n) for n in names},
                     "epochs_reported": len(steps), "last_reported": t.intermediate_values[steps[-1]] if steps else None,
                     "duration_s": round(duration, 1) if duration is not None else None,
                     "start": t.datetime_start.isoformat(timespec="seconds") if t.datetime_start else None,
                     "notes": "; ".join(notes)})
    return rows


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value).replace("|", "/").replace("\n", " ")


def write_summary(study, run_dir, *, space: Sequence[SearchParam] = (), plots: bool = True) -> Dict[str, Any]:
    """``study_trials.csv`` and ``study_summary.md`` (all trials, the best one), and with ``plots`` the
    optimisation history, parameter importances (from 2 complete trials on) and intermediate values."""
    from optuna.trial import TrialState

    run_dir = Path(run_dir)
    rows = trial_rows(study, space)
    columns = list(rows[0]) if rows else ["number", "state", "value"]
    with open(run_dir / "study_trials.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    counts = {k: v for k, v in _counts(study).items() if v and k != "errors"}
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    lines = [f"# optuna study `{study.study_name}`", "",
             "Trials: " + ", ".join(f"{v} {k.lower()}" for k, v in counts.items()), ""]
    if space:
        lines += ["Search space: " + "; ".join(str(p) for p in space), ""]
    if complete:
        best = study.best_trial
        lines += [f"Best: trial {best.number}, validation mAP {best.value:.6g}: "
                  + ", ".join(f"`{k}={v:.6g}`" for k, v in best.params.items()), ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in columns) + " |" for r in rows]
    (run_dir / "study_summary.md").write_text("\n".join(lines) + "\n")
    written = {"counts": counts, "files": ["study_trials.csv", "study_summary.md"], "skipped": {}}
    if plots:
        written["files"] += _plots(study, run_dir, complete, written["skipped"])
    return written


def _plots(study, run_dir: Path, complete, skipped: Dict[str, str]) -> List[str]:
    try:
        import matplotlib

        if "matplotlib.pyplot" not in sys.modules:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as ovm
    except ImportError as err:
        skipped["plots"] = f"matplotlib is not installed ({err})"
        return []
    plots = {"optimization_history.png": ovm.plot_optimization_history}
    if len(complete) >= 2:
        plots["param_importances.png"] = ovm.plot_param_importances
    else:
        skipped["param_importances.png"] = f"{len(complete)} complete trial(s); importances need 2"
    if any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
        plots["intermediate_values.png"] = ovm.plot_intermediate_values
    written = []
    for filename, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # optuna's matplotlib backend is 'experimental'
                axes = plot(study)
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
            figure.tight_layout()
            figure.savefig(run_dir / filename, dpi=120)
            plt.close(figure)
            written.append(filename)
        except Exception as err:  # a plot never stops a search
            skipped[filename] = f"{type(err).__name__}: {err}"
    return written


__all__ = ["SearchParam", "PAPER_SPACE", "PRUNERS", "parse_search", "search_space", "config_changes",
           "current_value", "format_objective_spec", "trial_config", "storage_url", "study_name", "make_storage",
           "make_pruner", "make_sampler", "fail_dead_trials", "retry_trial", "write_summary", "trial_rows", "optimize"]
