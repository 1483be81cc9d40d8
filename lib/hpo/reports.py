"""What a search leaves in its run directory: ``study_trials.csv``, ``study_summary.md`` and optuna's
plots (history, importances, intermediate values)."""
from __future__ import annotations

import csv
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Sequence

from lib.hpo.liveness import _counts
from lib.hpo.space import SearchParam


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


__all__ = ["trial_rows", "write_summary"]
