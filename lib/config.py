"""The training configuration: one dataclass holds every option, its default and its help.

``main.py`` fills it from (in increasing priority) the defaults below, a YAML file (``--config``),
and command-line flags, whose names are the fields' with ``-`` for ``_`` (the seed's flag names).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml


def opt(default, help: str, short: Optional[str] = None, choices: Optional[Sequence] = None, **extra):
    meta = {"help": help, "short": short, "choices": choices, **extra}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Config:
    # data
    training_dataset: str = opt("cjk-glyphs-mini", "training dataset: a registered name, a split JSON or a class-folder", "-d")
    test_datasets: str = opt("cjk-glyphs-mini-test", "comma-separated test datasets", "-td")
    data_root: str = opt("data", "folder holding the datasets")
    val_ratio: float = opt(0.5, "share of the training classes held out for validation", low=0.0, high=1.0, high_open=True)
    directory: Optional[str] = opt(None, "run directory (default: runs/<dataset>-<mode>-<time>)")
    val: bool = opt(False, "--val: validate on the validation classes every --val-freq epochs, train on the training "
                              "classes only and keep the best epoch; --no-val (the default, the paper's final run): train on "
                              "train+val and keep the last epoch")
    val_freq: int = opt(1, "validate every N epochs", low=1)
    save_freq: int = opt(1, "write the 'last' checkpoint every N epochs", low=1)
    # networks
    student: Optional[str] = opt("tf_efficientnet_lite0", "student architecture (timm or torchvision name)", "-s")
    student_path: Optional[str] = opt(None, "initialise the student from a checkpoint (kept as it is; --student-init "
                                            "regress or pca refit its whitening)", "-spath")
    teacher: Optional[str] = opt(None, "teacher architecture, used with its ImageNet weights as is", "-t")
    teacher_path: Optional[str] = opt(None, "teacher checkpoint (file, pretrained/ name or published name)", "-tpath")
    train_teacher: bool = opt(True, "without --teacher/--teacher-path in a ts mode, first train a teacher in 'sym' "
                                    "mode at --teacher-image-size from the student's architecture")
    teacher_epochs: int = opt(3, "epochs of that teacher training", low=1)
    teacher_neg_num: int = opt(0, "mined negatives per anchor in that teacher training (0: the other classes of the "
                                  "batch, 7 at the default batch)", low=0)
    teacher_batch_size: int = opt(32, "images per batch of that teacher training (classes x --samples-per-class, "
                                      "4 when that is 0)", low=1)
    teacher_lr: float = opt(3e-4, "learning rate of that teacher training", low=0.0, low_open=True)
    pool: str = opt("gem", "pooling", "-p", choices=("gem", "gemmp", "mac", "spoc", "rmac"))
    whitening: int = opt(128, "embedding dimension of the learnable whitening (0: none)", "-w", low=0)
    pretrained: bool = opt(True, "--not-pretrained: random initial weights instead of ImageNet's", flag="--not-pretrained")
    weights: Optional[str] = opt(None, "local ImageNet state dict for the backbones")
    student_init: str = opt("auto", "where the student starts: 'teacher' (copy its weights; same architecture), 'regress' "
                                    "(whitening fitted onto the teacher's embeddings), 'pca' (whitening from the data, "
                                    "'sym'), 'auto' (teacher if the architectures match, else regress; pca in 'sym'), "
                                    "'none' (ImageNet backbone, random whitening: the paper)",
                            choices=("auto", "teacher", "regress", "pca", "none"))
    freeze_bn: bool = opt(True, "freeze BatchNorm running statistics (--no-freeze-bn to update them)")
    # method
    mode: str = opt("ts_aug", "training mode", "-m", choices=("ts_aug", "ts_reg", "sym"))
    loss_margin: float = opt(0.7, "triplet margin ('sym')", "-lm", low=0.0)
    lam_1: float = opt(0.7, "weight of the student-teacher relative term ('ts_aug')", low=0.0)
    lam_2: float = opt(0.7, "weight of the student-student relative term ('ts_aug')", low=0.0)
    lam_label: float = opt(0.5, "weight of the label term added to 'ts_aug': asymmetric multi-similarity of the student's "
                                "queries against the teacher's embeddings of the batch, same class = positive (0: the "
                                "paper's three terms alone)", low=0.0)
    lam_csd: float = opt(1.0, "weight of contextual similarity distillation added to 'ts_aug' (csd, Wu et al., CVPR 2022): "
                              "each student query reproduces the teacher's similarity distribution over its nearest "
                              "teacher embeddings of the batch and of the last 1024 teacher views (0: off)", low=0.0)
    objective: List[str] = opt([], "extra objective name[:weight][:k=v,...] (repeatable); see README", action="append")
    image_size: int = opt(96, "student (query) image size", low=1)
    teacher_image_size: int = opt(128, "teacher (database) image size", low=1)
    neg_num: int = opt(4, "distance-weighted negatives per query ('sym'; 0: in-batch negatives only)", "-nn", low=0)
    pos_num: int = opt(4, "views per image ('ts_aug'; the paper: 8)", "-pn", low=1)
    query_size: int = opt(8000, "images per epoch", "-qs", low=1)
    pool_size: int = opt(20000, "negative-mining pool size ('sym')", "-ps", low=1)
    samples_per_class: int = opt(0, "class-balanced batches with K images per class (0: 'sym' and the teacher stage use 4, "
                                    "'ts_aug' 2 when --lam-label is on, else plain shuffling); a class with fewer than K "
                                    "images repeats some", low=0)
    crop_scale: float = opt(0.08, "smallest area share of the random crop of 'ts_aug' views (1: the whole image)",
                            low=0.0, high=1.0, low_open=True)
    mixup_alpha: float = opt(0.2, "Beta(a, a) of the mixup in 'ts_aug' (0: off)", low=0.0)
    view_backend: str = opt("pil", "how 'ts_aug' views are jittered, resized and mixed: pil (Pillow, float views "
                                   "from the workers; bit-identical to earlier runs) or tensor (jitter as one colour "
                                   "table, torchvision's uint8 resize, uint8 views mixed and normalised on the device; "
                                   "pixels within 1 level of pil on average, 24 at most; about 2x the views/s per "
                                   "worker)", choices=("pil", "tensor"))
    # optimisation
    device: str = opt("auto", "auto, cpu, cuda, cuda:N")
    gpu_id: Optional[str] = opt(None, "seed compatibility: '0' or '0,1' (the teacher on the second GPU)", "-g")
    teacher_device: Optional[str] = opt(None, "device of the teacher (default: the student's)")
    amp: str = opt("auto", "autocast: auto (bf16 on CUDA when supported, else fp16), bf16, fp16, none", choices=("auto", "bf16", "fp16", "none"))
    channels_last: bool = opt(True, "channels_last memory format on CUDA")
    workers: int = opt(2, "data-loading workers", "-j", low=0)
    epochs: int = opt(1, "epochs", low=1)
    batch_size: int = opt(8, "images per batch (each gives --pos-num views in 'ts_aug')", "-b", low=1)
    update_every: int = opt(1, "optimizer step every N batches (gradient accumulation)", "-u", low=1)
    optimizer: str = opt("adamW", "optimizer", "-o", choices=("sgd", "adam", "adamW"))
    scheduler: str = opt("onecycle", "learning-rate schedule, stepped per optimizer step", choices=("onecycle", "cyclic", "exponential", "none"))
    lr: float = opt(1.5e-4, "learning rate", aliases=("--learning-rate",), low=0.0, low_open=True)
    momentum: float = opt(0.9, "SGD momentum", low=0.0, high=1.0, high_open=True)
    weight_decay: float = opt(1e-6, "weight decay", aliases=("--wd",), low=0.0)
    print_freq: int = opt(10, "progress-bar refresh every N batches", low=1)
    resume_student: Optional[str] = opt(None, "resume from a training checkpoint ('last' = <directory>/last.pth)")
    comment: str = opt("", "comment appended to the run name", "-c")
    logger: str = opt("tensorboard", "logger", choices=("tensorboard", "none"))
    seed: int = opt(1234, "random seed", low=0)
    optimize: bool = opt(False, "tune hyper-parameters with optuna on the validation split first")
    trials: int = opt(6, "optuna trials", low=1)
    overwrite: bool = opt(False, "allow writing into an existing run directory that holds another run")
    # hyper-parameter search (lib/hpo/)
    search: List[str] = opt([], "with --optimize: search PARAM in a range, PARAM=LOW:HIGH[:log][:int] (repeatable); PARAM "
                                "is a numeric option or objective.NAME.KEY / objective.NAME.weight; it joins or overrides "
                                "the paper's space lr=1e-4:2e-4:log, lam_1=0.6:0.8, lam_2=0.6:0.8; PARAM=off drops one",
                            action="append")
    storage: Optional[str] = opt(None, "optuna storage: an SQLAlchemy URL or an SQLite file (default <directory>/study.db); "
                                       "processes and machines naming the same storage and --study-name share one search")
    study_name: Optional[str] = opt(None, "optuna study name (default: the run directory's name)")
    resume: bool = opt(False, "with --optimize: continue the study in --storage (a killed trial is retried) or join it "
                              "from another process; --trials counts the trials already finished")
    pruner: str = opt("none", "stop poor trials on the validation mAP of each validation epoch (none: the paper)",
                      choices=("none", "median", "hyperband"))
    search_only: bool = opt(False, "with --optimize: stop after the search, without the final run (helper workers)")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Resolution-asymmetric metric learning: distillation training",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML file setting any option below (flags win)")
    for f in fields(Config):
        meta = f.metadata
        name = "--" + f.name.replace("_", "-")
        names = [name] + ([meta["short"]] if meta.get("short") else []) + list(meta.get("aliases", ()))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kwargs: Dict[str, Any] = dict(dest=f.name, help=meta["help"], default=argparse.SUPPRESS)
        if meta.get("flag"):  # --not-pretrained
            parser.add_argument(meta["flag"], action="store_false", **kwargs)
        elif isinstance(default, bool):
            parser.add_argument(*names, action=argparse.BooleanOptionalAction, **kwargs)
        elif meta.get("action") == "append":
            parser.add_argument(*names, action="append", **kwargs)
        else:
            ftype = {int: int, float: float}.get(type(default), str)
            if f.name in ("lr", "loss_margin", "lam_1", "lam_2", "weight_decay", "momentum", "val_ratio",
                          "teacher_lr", "mixup_alpha", "crop_scale"):
                ftype = float
            parser.add_argument(*names, type=ftype, choices=meta.get("choices"), **kwargs)
    return parser


def load_config(argv: Optional[Sequence[str]] = None) -> Config:
    """Defaults < YAML (``--config``) < flags; every value checked (type and range) before it is used."""
    args = vars(build_parser().parse_args(argv))
    values: Dict[str, Any] = {}
    sources: Dict[str, str] = {}
    config_file = args.pop("config", None)
    if config_file:
        values.update(read_yaml(config_file))
        sources.update({k: f"config file {config_file}" for k in values})
    values.update(args)
    sources.update({k: "command line" for k in args})
    return make_config(values, source=config_file or "command line", sources=sources)


def read_yaml(path: str | Path) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ValueError(f"config file {path}{where}: YAML syntax error: {problem}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: expected a mapping of option: value, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_value(name: str, value: Any, kind: str, meta: Dict[str, Any], where: str) -> Any:
    """``value`` of option ``name`` converted to its type (``kind``: the field's annotation) and checked
    against its range; a ``ValueError`` names the option, the value and ``where`` it came from.

    Floats also accept a string that reads as a number (YAML reads ``1e-4`` without a dot as a string);
    integers accept integers only (``epochs: "3"`` is refused: the quotes make it text)."""
    def fail(what: str) -> ValueError:
        return ValueError(f"{where}: option {name} ({_flag(name)}) = {value!r}: {what}")

    optional = kind.startswith("Optional[")
    base = kind[len("Optional["):-1] if optional else kind
    if value is None:
        if optional:
            return None
        raise fail(f"expected {'an integer' if base == 'int' else 'a number' if base == 'float' else 'a ' + base}, got nothing")
    if base == "bool":
        if not isinstance(value, bool):
            raise fail("expected true or false")
    elif base == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail(f"expected an integer, got {type(value).__name__}"
                       + (" (remove the quotes)" if isinstance(value, str) and value.strip().lstrip("+-").isdigit() else ""))
    elif base == "float":
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise fail("expected a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail(f"expected a number, got {type(value).__name__}")
        value = float(value)
        if not math.isfinite(value):
            raise fail("expected a finite number")
    elif base == "str":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # gpu_id: 0, comment: 5
        if not isinstance(value, str):
            raise fail(f"expected a string, got {type(value).__name__}")
    if base in ("int", "float"):
        low, high = meta.get("low"), meta.get("high")
        if low is not None and (value < low or (meta.get("low_open") and value == low)):
            raise fail(f"must be {'>' if meta.get('low_open') else '>='} {low}"
                       + (f" and {'<' if meta.get('high_open') else '<='} {high}" if high is not None else ""))
        if high is not None and (value > high or (meta.get("high_open") and value == high)):
            raise fail(f"must be {'<' if meta.get('high_open') else '<='} {high}"
                       + (f" and {'>' if meta.get('low_open') else '>='} {low}" if low is not None else ""))
    choices = meta.get("choices")
    if choices and value not in choices:
        raise fail(f"is not one of {list(choices)}")
    return value


def make_config(values: Dict[str, Any], source: str = "config", sources: Optional[Dict[str, str]] = None) -> Config:
    """A :class:`Config` from ``values`` (option name -> value), every value checked by :func:`check_value`;
    ``sources`` says where each value came from (for the error messages), ``source`` is the default."""
    known = {f.name for f in fields(Config)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{source}: unknown option(s) {unknown}; see python main.py --help")
    sources = sources or {}
    checked = dict(values)
    for f in fields(Config):
        if f.name in values and not str(f.type).startswith("List["):  # objective/search: checked by their parsers
            checked[f.name] = check_value(f.name, values[f.name], str(f.type), dict(f.metadata),
                                          sources.get(f.name, source))
    return Config(**checked)


__all__ = ["Config", "build_parser", "check_value", "load_config", "make_config", "read_yaml"]
