"""Where a study lives and how it draws: the RDB storage (SQLite file or any SQLAlchemy URL, with
heartbeats so that a dead worker's trial is failed and retried), the pruner, and the sampler whose
first trial is the configured values. optuna is imported inside the functions only."""
from __future__ import annotations

import inspect
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from lib.config import Config

PRUNERS = ("none", "median", "hyperband")
HEARTBEAT_S = 60     # a RUNNING trial whose process stopped beating for GRACE_S is failed and retried
GRACE_S = 180
MAX_RETRIES = 2      # re-runs of a trial killed with its process


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



__all__ = ["PRUNERS", "HEARTBEAT_S", "GRACE_S", "MAX_RETRIES", "storage_url", "study_name", "make_storage",
           "make_pruner", "make_sampler", "retry_trial"]
