"""Which trials are still alive: the identity of this worker process (host, boot, pid namespace, pid),
whether a process of this machine still runs, and failing (then retrying) the RUNNING trials of dead
processes; trial counts by state."""
from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path
from typing import Any, Dict, List

from lib.hpo.storage import retry_trial


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



__all__ = ["fail_dead_trials"]
