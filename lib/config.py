"""The training configuration: one dataclass holds every option, its default and its help.

``main.py`` fills it from (in increasing priority) the defaults below, a YAML file (``--config``),
and command-line flags, whose names are the fields' with ``-`` for ``_`` (the seed's flag names).
"""
from __future__ import annotations

import argparse
import dataclasses
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
    val_ratio: float = opt(0.5, "share of the training classes held out for validation")
    directory: Optional[str] = opt(None, "run directory (default: runs/<dataset>-<mode>-<time>)")
    val: bool = opt(True, "--no-val: no validation; train on train+val and keep the last epoch", flag="--no-val")
    val_freq: int = opt(1, "validate every N epochs")
    save_freq: int = opt(1, "write the 'last' checkpoint every N epochs")
    # networks
    student: Optional[str] = opt("tf_efficientnet_lite0", "student architecture (timm or torchvision name)", "-s")
    student_path: Optional[str] = opt(None, "initialise the student from a checkpoint", "-spath")
    teacher: Optional[str] = opt(None, "teacher architecture, used with its ImageNet weights as is", "-t")
    teacher_path: Optional[str] = opt(None, "teacher checkpoint (file, pretrained/ name or published name)", "-tpath")
    train_teacher: bool = opt(True, "without --teacher/--teacher-path in a ts mode, first train a teacher in 'sym' "
                                    "mode at --teacher-image-size from the student's architecture")
    teacher_epochs: int = opt(6, "epochs of that teacher training")
    teacher_neg_num: int = opt(0, "mined negatives per anchor in that teacher training (0: the other classes of the "
                                  "batch, 7 at the default batch)")
    teacher_batch_size: int = opt(32, "images per batch of that teacher training (classes x --samples-per-class, "
                                      "4 when that is 0)")
    teacher_lr: float = opt(3e-4, "learning rate of that teacher training")
    pool: str = opt("gem", "pooling", "-p", choices=("gem", "gemmp", "mac", "spoc", "rmac"))
    whitening: int = opt(128, "embedding dimension of the learnable whitening (0: none)", "-w")
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
    loss_margin: float = opt(0.7, "triplet margin ('sym')", "-lm")
    lam_1: float = opt(0.7, "weight of the student-teacher relative term ('ts_aug')")
    lam_2: float = opt(0.7, "weight of the student-student relative term ('ts_aug')")
    lam_label: float = opt(0.5, "weight of the label term added to 'ts_aug': asymmetric multi-similarity of the student's "
                                "queries against the teacher's embeddings of the batch, same class = positive (0: the "
                                "paper's three terms alone)")
    objective: List[str] = opt([], "extra objective name[:weight][:k=v,...] (repeatable); see README", action="append")
    image_size: int = opt(96, "student (query) image size")
    teacher_image_size: int = opt(128, "teacher (database) image size")
    neg_num: int = opt(4, "distance-weighted negatives per query ('sym'; 0: in-batch negatives only)", "-nn")
    pos_num: int = opt(4, "views per image ('ts_aug'; the paper: 8)", "-pn")
    query_size: int = opt(8000, "images per epoch", "-qs")
    pool_size: int = opt(20000, "negative-mining pool size ('sym')", "-ps")
    samples_per_class: int = opt(0, "class-balanced batches with K images per class (0: 'sym' uses 4, 'ts_aug' 2 when "
                                    "--lam-label is on, else plain shuffling)")
    crop_scale: float = opt(0.08, "smallest area share of the random crop of 'ts_aug' views (1: the whole image)")
    mixup_alpha: float = opt(0.2, "Beta(a, a) of the mixup in 'ts_aug' (0: off)")
    view_backend: str = opt("pil", "how 'ts_aug' views are resized and mixed: pil (Pillow, float views from the "
                                   "workers; bit-identical to earlier runs) or tensor (torchvision's uint8 resize, "
                                   "uint8 views mixed and normalised on the device; pixels within 1/255, about "
                                   "1.5x the views/s per worker)", choices=("pil", "tensor"))
    # optimisation
    device: str = opt("auto", "auto, cpu, cuda, cuda:N")
    gpu_id: Optional[str] = opt(None, "seed compatibility: '0' or '0,1' (the teacher on the second GPU)", "-g")
    teacher_device: Optional[str] = opt(None, "device of the teacher (default: the student's)")
    amp: str = opt("auto", "autocast: auto (bf16 on CUDA when supported, else fp16), bf16, fp16, none", choices=("auto", "bf16", "fp16", "none"))
    channels_last: bool = opt(True, "channels_last memory format on CUDA")
    workers: int = opt(2, "data-loading workers", "-j")
    epochs: int = opt(3, "epochs")
    batch_size: int = opt(8, "images per batch (each gives --pos-num views in 'ts_aug')", "-b")
    update_every: int = opt(1, "optimizer step every N batches (gradient accumulation)", "-u")
    optimizer: str = opt("adamW", "optimizer", "-o", choices=("sgd", "adam", "adamW"))
    scheduler: str = opt("onecycle", "learning-rate schedule, stepped per optimizer step", choices=("onecycle", "cyclic", "exponential", "none"))
    lr: float = opt(1.5e-4, "learning rate", aliases=("--learning-rate",))
    momentum: float = opt(0.9, "SGD momentum")
    weight_decay: float = opt(1e-6, "weight decay", aliases=("--wd",))
    print_freq: int = opt(10, "progress-bar refresh every N batches")
    resume_student: Optional[str] = opt(None, "resume from a training checkpoint ('last' = <directory>/last.pth)")
    comment: str = opt("", "comment appended to the run name", "-c")
    logger: str = opt("tensorboard", "logger", choices=("tensorboard", "none"))
    seed: int = opt(1234, "random seed")
    optimize: bool = opt(False, "tune hyper-parameters with optuna on the validation split first")
    trials: int = opt(6, "optuna trials")
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
    """Defaults < YAML (``--config``) < flags."""
    args = vars(build_parser().parse_args(argv))
    values: Dict[str, Any] = {}
    config_file = args.pop("config", None)
    if config_file:
        values.update(read_yaml(config_file))
    values.update(args)
    return make_config(values, source=config_file or "command line")


def read_yaml(path: str | Path) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: expected a mapping of option: value, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def make_config(values: Dict[str, Any], source: str = "config") -> Config:
    known = {f.name for f in fields(Config)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{source}: unknown option(s) {unknown}; see python main.py --help")
    config = Config(**values)
    for f in fields(Config):
        choices = f.metadata.get("choices")
        if choices and getattr(config, f.name) not in choices:
            raise ValueError(f"{source}: {f.name}={getattr(config, f.name)!r} is not one of {list(choices)}")
    return config


__all__ = ["Config", "build_parser", "load_config", "make_config", "read_yaml"]
