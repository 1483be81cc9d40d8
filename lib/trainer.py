"""The training loop: objectives summed with weights, AMP, gradient accumulation, a scheduler stepped
per optimizer step, frozen BatchNorm, validation, best/last checkpoints and exact resume."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from lib.cache import EmbeddingCache
from lib.checkpoint import atomic_save, check_compatible, load_checkpoint, network_fingerprint, network_state
from lib.distributed import DistInfo, all_reduce_mean, barrier, gather_embeddings
from lib.evaluation.protocol import evaluate_settings
from lib.extract import cached_extract, extract
from lib.utils import autocast_context, resolve_amp
from lib.losses import build_objective
from lib.losses.base import ObjectiveSpec, parse_objective_spec
from lib.modes import MODES
from lib.student_init import initialise_student
from lib.models.net import RetrievalNet, set_batchnorm_eval


def make_optimizer(cfg, student: RetrievalNet, objectives: Sequence[nn.Module]) -> torch.optim.Optimizer:
    """Backbone and whitening at ``lr``; GeM's p at 10x lr without weight decay (the paper); the
    objectives' own parameters (proxies, margins, flows) at ``lr * objective.lr_multiplier``."""
    groups = [{"params": list(student.backbone.parameters()), "name": "backbone"}]
    pool_params = list(student.pool.parameters())
    if pool_params:
        groups.append({"params": pool_params, "lr": cfg.lr * 10, "weight_decay": 0.0, "name": "pool"})
    if student.whiten is not None:
        groups.append({"params": list(student.whiten.parameters()), "name": "whiten"})
    for i, objective in enumerate(objectives):
        # an objective with parts at different rates (NIR: proxies and flow) lists them itself
        parts = objective.parameter_groups() if hasattr(objective, "parameter_groups") else [
            {"params": list(objective.parameters()), "lr_multiplier": getattr(objective, "lr_multiplier", 1.0)}]
        for j, part in enumerate(parts):
            params = [p for p in part["params"] if p.requires_grad]
            if params:
                groups.append({"params": params, "lr": cfg.lr * part["lr_multiplier"], "name": f"objective{i}.{j}"})
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamW":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose sgd, adam or adamW")


def make_scheduler(cfg, optimizer, steps_per_epoch: int):
    """Every schedule is stepped once per optimizer step (after each accumulated update)."""
    total = max(1, cfg.epochs * steps_per_epoch)
    max_lrs = [g["lr"] for g in optimizer.param_groups]
    if cfg.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lrs, total_steps=total, div_factor=10)
    if cfg.scheduler == "cyclic":
        return torch.optim.lr_scheduler.CyclicLR(optimizer, base_lr=[lr / 10 for lr in max_lrs], max_lr=max_lrs,
                                                 step_size_up=max(1, total // 6), mode="triangular2", cycle_momentum=False)
    if cfg.scheduler == "exponential":
        # the reference decays by exp(-0.001) per epoch; per optimizer step that is exp(-0.001 / steps)
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=math.exp(-0.001 / steps_per_epoch))
    if cfg.scheduler == "none":
        return None
    raise ValueError(f"unknown scheduler {cfg.scheduler!r}")


class Validator:
    """Asymmetric (student queries vs the teacher's database) and symmetric retrieval on held-out
    classes; the teacher's embeddings are computed once (and cached on disk)."""

    def __init__(self, cfg, paths: Sequence[str], labels: Sequence[int], teacher: Optional[RetrievalNet], *,
                 device, teacher_device, cache: EmbeddingCache, name: str = "val"):
        self.cfg, self.paths, self.labels, self.device, self.name = cfg, list(paths), torch.as_tensor(labels), device, name
        self.teacher_embeddings = None
        if teacher is not None:
            self.teacher_embeddings = cached_extract(
                cache, teacher, self.paths, cfg.teacher_image_size, device=teacher_device, workers=cfg.workers,
                progress=f"teacher embeddings ({name})")

    def __call__(self, student: RetrievalNet) -> Dict[str, float]:
        embeddings = {"student": extract(student, self.paths, self.cfg.image_size, device=self.device,
                                         workers=self.cfg.workers, progress=f"validation ({self.name})")}
        settings = {"sym": ("student", "student")}
        if self.teacher_embeddings is not None:
            embeddings["teacher"] = self.teacher_embeddings
            settings = {"asym": ("student", "teacher"), **settings}
        results = evaluate_settings(embeddings, self.labels, settings, ks=(1, 2, 4, 8))
        self.last = (embeddings, settings)  # for log_images
        flat = {f"{setting}/{metric}": value for setting, metrics in results.items() for metric, value in metrics.items()
                if isinstance(value, float)}
        flat["score"] = flat["asym/mAP"] if "asym/mAP" in flat else flat["sym/mAP"]
        return flat

    def log_images(self, logger, step: int, num_queries: int = 6, k: int = 5) -> None:
        """The retrieval grid of the last validation (asym and sym side by side) as a TensorBoard image."""
        from lib.evaluation.visualize import retrieval_figure
        from lib.logger import NullLogger

        if type(logger) is NullLogger or getattr(self, "last", None) is None:  # nothing would show it
            return
        embeddings, settings = self.last
        sizes = {"student": self.cfg.image_size, "teacher": self.cfg.teacher_image_size}
        logger.image(f"val/retrieval ({self.name})", retrieval_figure(embeddings, self.labels, self.paths, settings, sizes,
                                                                      num_queries=num_queries, k=k), step)


@dataclass
class TrainResult:
    best_score: Optional[float]
    best_epoch: Optional[int]
    best_path: Path
    last_path: Path
    history: List[Dict[str, float]] = field(default_factory=list)
    start_val: Optional[Dict[str, float]] = None  # validation before the first step


def accumulation_divisors(num_batches: int, update_every: int) -> List[int]:
    """For each batch, the number of batches in its accumulation group (the last group may be short)."""
    out = []
    for start in range(0, num_batches, update_every):
        size = min(update_every, num_batches - start)
        out += [size] * size
    return out


def learned_miners(objectives: Sequence[nn.Module], names: Sequence[str]) -> List[Tuple[str, nn.Module]]:
    """``(objective name, miner)`` for every miner inside ``objectives`` that learns from the validation
    score (``learns_from_validation``, the PADS ``parametric`` miner)."""
    return [(name, m) for name, obj in zip(names, objectives) for m in obj.modules()
            if getattr(m, "learns_from_validation", False)]


def check_learned_miners(cfg) -> None:
    """Refuse, before anything runs, a configuration whose learned miner (``miner=parametric``) would
    never learn: it learns from the change of the validation score, so its run must validate."""
    from lib.miners import MINERS

    for spec in map(parse_objective_spec, cfg.objective):
        miner = spec.params.get("miner")
        if not isinstance(miner, str) or miner not in MINERS:
            continue
        if not getattr(MINERS.get_class(miner), "learns_from_validation", False):
            continue
        if not cfg.val:
            raise ValueError(f"--objective {spec.name}:...:miner={miner}: the {miner!r} miner learns from the change "
                             "of the validation score, and --no-val trains without validation; drop --no-val or "
                             "pick another miner")
        if getattr(cfg, "optimize", False) and not getattr(cfg, "search_only", False):
            raise ValueError(f"--objective {spec.name}:...:miner={miner} with --optimize: the final run trains on "
                             f"train+val without validation, from which the {miner!r} miner learns; run the search "
                             "with --search-only, then train with the best values and validation")


def compose_objectives(base: Sequence[ObjectiveSpec], extra: Sequence) -> List[ObjectiveSpec]:
    """The mode's own objectives, then the user's (``--objective``). A user spec naming one of the
    mode's objectives replaces it (``--objective absolute:2`` reweights it, ``mined_triplet:1:margin=0.2``
    changes its parameters); weight 0 drops an objective (``--objective mined_triplet:0`` trains 'sym'
    with the added objectives alone)."""
    specs = [parse_objective_spec(s) for s in base]
    for spec in map(parse_objective_spec, extra):
        same = [k for k, b in enumerate(specs) if b.name == spec.name]
        if same and same[0] < len(base):
            specs[same[0]] = spec
        else:
            specs.append(spec)
    specs = [s for s in specs if s.weight != 0]
    if not specs:
        raise ValueError("no objective left to train: every objective has weight 0")
    return specs


def train(cfg, run_dir: Path, student: RetrievalNet, teacher: Optional[RetrievalNet], paths: Sequence[str],
          labels: Sequence[int], *, validator: Optional[Validator], device: torch.device,
          teacher_device: torch.device, logger, cache: EmbeddingCache, dist_info: DistInfo = DistInfo(),
          trial=None, resume: Optional[str] = None, tag: str = "") -> TrainResult:
    """Train ``student`` in ``cfg.mode``; returns the best validation score and checkpoint paths.

    ``trial`` (optuna) receives the validation score of every validation epoch and may prune.
    """
    run_dir = Path(run_dir)
    last_path, best_path = run_dir / "checkpoint_last.pth", run_dir / "model_best.pth"
    student.meta["image_size"] = cfg.image_size
    student.to(device)
    if teacher is not None:
        teacher.to(teacher_device).eval()
        if cfg.channels_last and teacher_device.type == "cuda":
            teacher.to(memory_format=torch.channels_last)
    if cfg.channels_last and device.type == "cuda":
        student.to(memory_format=torch.channels_last)

    # the space the student is distilled into, recorded in its checkpoints for search.py's pairing check
    paired = {"teacher_fingerprint": network_fingerprint(teacher)} if teacher is not None else {}
    if not resume and dist_info.is_main:  # DDP then broadcasts rank 0's weights
        done = initialise_student(cfg.student_init, student, teacher, paths, labels, image_size=cfg.image_size,
                                  teacher_image_size=cfg.teacher_image_size, device=device, teacher_device=teacher_device,
                                  workers=cfg.workers, cache=cache, from_checkpoint=cfg.student_path)
        print(f">> {tag or 'student '}initialisation: {done}")
    mode = MODES.get_class(cfg.mode)(cfg, student, teacher, paths, labels, device=device, teacher_device=teacher_device,
                                     cache=cache, rank=dist_info.rank, world_size=dist_info.world_size)
    num_classes = int(torch.as_tensor(labels).max()) + 1
    specs_objectives = [build_objective(spec, embedding_dim=student.outputdim, num_classes=num_classes)
                        for spec in compose_objectives(mode.base_objectives(), cfg.objective)]
    objectives = nn.ModuleList([obj for _, obj in specs_objectives]).to(device)
    names = _unique_names([spec.name for spec, _ in specs_objectives])
    weights = [spec.weight for spec, _ in specs_objectives]
    miners = learned_miners(objectives, names)  # updated after each validation with the score's change
    if miners and not cfg.val:
        raise ValueError(f"objective {miners[0][0]!r}: its {type(miners[0][1]).__name__} learns from the change of "
                         "the validation score; this run has no validation (--no-val, the default): add --val")

    model: nn.Module = student
    if dist_info.enabled:
        model = nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False)

    num_batches = len(mode.batch_sampler)
    if num_batches == 0:
        raise ValueError(f"no training batch: {len(paths)} images, batch size {cfg.batch_size}, query size {cfg.query_size}")
    divisors = accumulation_divisors(num_batches, cfg.update_every)
    steps_per_epoch = math.ceil(num_batches / cfg.update_every)
    optimizer = make_optimizer(cfg, student, objectives)
    scheduler = make_scheduler(cfg, optimizer, steps_per_epoch)
    amp = resolve_amp(cfg.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")

    start_epoch, best_score, best_epoch, history = 0, None, None, []
    if resume:
        state = load_checkpoint(resume)
        check_compatible(student, state, str(resume))
        if state.get("mode") != cfg.mode:
            raise ValueError(f"{resume} was trained in mode {state.get('mode')!r}, this run is {cfg.mode!r}")
        student.load_state_dict(state["state_dict"])
        objectives.load_state_dict(state["objectives"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, best_score, best_epoch = state["epoch"], state.get("best_score"), state.get("best_epoch")
        history = list(state.get("history", []))
        torch.set_rng_state(state["rng"]["torch"])
        if torch.cuda.is_available() and state["rng"].get("cuda"):
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        if dist_info.is_main:
            print(f">> resumed {resume} at epoch {start_epoch}/{cfg.epochs}")

    if resume:
        start_val = state.get("start_val")
    elif validator is not None and dist_info.is_main:
        # where training starts, so a run shows whether it improves on its initialisation
        start_val = validator(student)
        validator.log_images(logger, 0)
        logger.scalars({f"val/{k}": v for k, v in start_val.items()}, 0)
        print(f">> {tag}epoch 0 (start): val mAP {100 * start_val['score']:.2f}{_alignment_note(start_val)}")
    else:
        start_val = None
    # not persistent: a worker holds the copy of the dataset made when it started, and set_epoch (the
    # per-sample generators' epoch, the sym negatives) reaches the workers only through a fresh start
    loader_kwargs = dict(num_workers=cfg.workers, pin_memory=device.type == "cuda",
                         persistent_workers=False)
    global_step = start_epoch * steps_per_epoch
    # the validation score the learned miners' next reward is measured from
    previous_score = next((h["val/score"] for h in reversed(history) if "val/score" in h), (start_val or {}).get("score"))
    for epoch in range(start_epoch, cfg.epochs):
        mode.set_epoch(epoch, student)  # may extract embeddings (sym mining), which leaves the net in eval
        model.train()
        if cfg.freeze_bn:
            set_batchnorm_eval(student)
        loader = torch.utils.data.DataLoader(mode.dataset, batch_sampler=mode.batch_sampler, **loader_kwargs)
        sums = {name: 0.0 for name in names + ["loss"]}
        seen, started = 0, time.time()
        bar = _progress(loader, f"{tag}epoch {epoch + 1}/{cfg.epochs}", dist_info.is_main)
        optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(bar):
            with autocast_context(device, amp):
                local = mode.embed(batch, model, epoch)
            embeddings = gather_embeddings(local, dist_info)
            terms = [w * obj(embeddings) for w, obj in zip(weights, objectives)]
            loss = sum(terms)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at epoch {epoch + 1}, batch {i + 1}: "
                                         + ", ".join(f"{n}={float(t):.4g}" for n, t in zip(names, terms)))
            scaler.scale(loss / divisors[i]).backward()
            if (i + 1) % cfg.update_every == 0 or i + 1 == num_batches:
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                if scheduler is not None:
                    scheduler.step()
                global_step += 1
            views = len(local.student)
            seen += views
            for name, term in zip(names, terms):
                sums[name] += float(term.detach())
            sums["loss"] += float(loss.detach())
            if dist_info.is_main and (i % max(1, cfg.print_freq) == 0 or i + 1 == num_batches):
                bar.set_postfix(loss=f"{sums['loss'] / (i + 1):.4f}", img_s=f"{seen / (time.time() - started):.1f}")
        record = {f"train/{name}": all_reduce_mean(value / num_batches, dist_info, device) for name, value in sums.items()}
        record["train/lr"] = optimizer.param_groups[0]["lr"]
        record["train/views_per_s"] = seen * dist_info.world_size / max(time.time() - started, 1e-9)
        record["epoch"] = epoch + 1

        validate = validator is not None and ((epoch + 1) % cfg.val_freq == 0 or epoch + 1 == cfg.epochs)
        if validate and dist_info.is_main:
            metrics = validator(student)
            validator.log_images(logger, epoch + 1)
            record.update({f"val/{k}": v for k, v in metrics.items()})
            improved = best_score is None or metrics["score"] > best_score
            if improved:
                best_score, best_epoch = metrics["score"], epoch + 1
                atomic_save(network_state(student, epoch=epoch + 1, val_metrics=metrics, mode=cfg.mode, **paired),
                            best_path)
            print(f">> {tag}epoch {epoch + 1}: loss {record['train/loss']:.4f}, val mAP {100 * metrics['score']:.2f}"
                  f"{_alignment_note(metrics)}"
                  f"{' (best)' if improved else f' (best {100 * best_score:.2f} at epoch {best_epoch})'}")
        elif dist_info.is_main:
            print(f">> {tag}epoch {epoch + 1}: loss {record['train/loss']:.4f}")
        if miners and cfg.val and ((epoch + 1) % cfg.val_freq == 0 or epoch + 1 == cfg.epochs):
            # (the condition of `validate` without the validator, which only rank 0 holds: every rank enters)
            # validation runs on rank 0: its reward reaches every rank (the others add 0), and every rank's
            # draws enter the one policy step, so the miners stay identical across ranks
            score = metrics["score"] if dist_info.is_main else 0.0
            reward = score - previous_score if dist_info.is_main and previous_score is not None else 0.0
            reward = all_reduce_mean(reward, dist_info, device) * dist_info.world_size
            previous_score = all_reduce_mean(score, dist_info, device) * dist_info.world_size
            for name, miner in miners:
                if dist_info.enabled:
                    torch.distributed.all_reduce(miner.bin_counts)
                stats = miner.update(reward)
                record[f"train/{name}_miner_reward"] = reward
                record[f"train/{name}_miner_entropy"] = stats["entropy"]
        if validator is None and dist_info.is_main:
            atomic_save(network_state(student, epoch=epoch + 1, mode=cfg.mode, **paired), best_path)  # no val: the last epoch
        history.append(record)
        if dist_info.is_main:
            logger.scalars({k: v for k, v in record.items() if k != "epoch"}, epoch + 1)
            if (epoch + 1) % cfg.save_freq == 0 or epoch + 1 == cfg.epochs:
                atomic_save(_training_state(cfg, student, objectives, optimizer, scheduler, scaler, epoch + 1,
                                            best_score, best_epoch, history, start_val, **paired), last_path)
        barrier(dist_info)
        if trial is not None and validate:
            trial.report(record["val/score"], epoch + 1)
            if trial.should_prune():
                import optuna

                raise optuna.TrialPruned(f"pruned at epoch {epoch + 1}")
    return TrainResult(best_score, best_epoch, best_path, last_path, history, start_val)


def _alignment_note(metrics: Dict[str, float]) -> str:
    if "asym/cos" not in metrics:
        return ""
    return f", student-teacher cos {metrics['asym/cos']:.3f}, self-R@1 {100 * metrics['asym/self-R@1']:.1f}"


def _training_state(cfg, student, objectives, optimizer, scheduler, scaler, epoch, best_score, best_epoch, history,
                    start_val=None, **extra):
    return network_state(
        student, mode=cfg.mode, epoch=epoch, best_score=best_score, best_epoch=best_epoch, history=history,
        start_val=start_val, **extra,
        objectives=objectives.state_dict(), optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict() if scheduler is not None else None, scaler=scaler.state_dict(),
        rng={"torch": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        config=cfg.to_dict())


def _unique_names(names: List[str]) -> List[str]:
    seen: Dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}{seen[name]}")
    return out


def _progress(iterable, desc: str, enabled: bool):
    if not enabled:
        return _Silent(iterable)
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, unit="batch", dynamic_ncols=True, leave=False, disable=None)


class _Silent:
    def __init__(self, iterable):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def set_postfix(self, **kwargs):
        pass


__all__ = ["train", "TrainResult", "Validator", "make_optimizer", "make_scheduler", "accumulation_divisors"]
