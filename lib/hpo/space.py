"""The search-space grammar: ``--search PARAM=LOW:HIGH[:log][:int]`` / YAML mappings -> ``SearchParam``s,
checked against the Config and the ``--objective`` specs, and searched values -> Config changes.
Needs no optuna (``SearchParam.suggest`` takes any object with optuna's trial API)."""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

from lib.config import Config
from lib.losses.base import ObjectiveSpec, parse_objective_spec

#: the paper's search space, per training mode (its HPO tuned ``ts_aug``; the others get its lr range)
PAPER_SPACE: Dict[str, Sequence[str]] = {
    "ts_aug": ("lr=1e-4:2e-4:log", "lam_1=0.6:0.8", "lam_2=0.6:0.8"),
    "ts_reg": ("lr=1e-4:2e-4:log",),
    "sym": ("lr=1e-4:2e-4:log",),
}
_OFF = ("off", "none", "false", "no")


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
MODE_WEIGHTS = {"ts_aug": {"lam_1": "relative_st", "lam_2": "relative_ss", "lam_label": "ms", "lam_csd": "csd"}}


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


def trial_config(cfg: Config, trial_dir: Path, params: Mapping[str, Any]) -> Config:
    """The configuration of one trial: the searched values, validation on, its own directory."""
    return cfg.replace(**config_changes(cfg, params), val=True, directory=str(trial_dir), resume_student=None,
                       optimize=False)



__all__ = ["SearchParam", "PAPER_SPACE", "MODE_WEIGHTS", "parse_search", "search_space", "current_value",
           "format_objective_spec", "config_changes", "trial_config"]
