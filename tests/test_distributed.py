"""Training beyond one process (lib/distributed.py, DDP in lib/trainer.py), on CPU with gloo.

* ``gather_embeddings``: the loss of the gathered global batch, back-propagated on 2 ranks and
  averaged as DDP averages gradients, gives the 1-process gradient of the same batch.
* ``main.main`` under 2 gloo processes (what ``torchrun --nproc_per_node 2`` sets up) trains the same
  student as 1 process with the same global batch and seed.
"""
from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lib.distributed import DistInfo, all_reduce_mean, gather_embeddings  # noqa: E402
from lib.embeddings import Embeddings  # noqa: E402
from lib.losses.distill import absolute_loss, relative_loss  # noqa: E402

WORLD = 2
# float32 sums of the 2 ranks' gradients run in another order than the 1-process backward, so the
# weights differ by float rounding. The training comparison uses SGD, whose step is linear in the
# gradient: an Adam step divides by sqrt(v) + eps and turns a gradient that is rounding noise into a
# full-size step of random sign (the GeM exponent of a randomly initialised net has |grad| ~ 6e-9).
WEIGHT_RTOL, WEIGHT_ATOL = 1e-5, 1e-6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def leave(barrier: bool = True) -> None:
    """End a spawned worker: wait for the other ranks, leave the process group, exit without finalizing.

    The results are on disk by now. ``os._exit`` skips interpreter finalization, where gloo's worker
    threads can still release tensors and abort the process (SIGABRT, "terminate called without an
    active exception"; pytorch/pytorch#179291), which CI once saw after every result was written.
    """
    if barrier and dist.is_initialized():
        dist.barrier()  # no rank leaves while another still talks to it
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _init(rank: int, world: int, port: int) -> DistInfo:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    return DistInfo(rank, world, rank)


# ---------------------------------------------------------------------------------------------------
# the differentiable gather
# ---------------------------------------------------------------------------------------------------
VIEWS, IMAGES_PER_RANK, DIM_IN, DIM = 3, 2, 6, 5


def global_batch():
    gen = torch.Generator().manual_seed(0)
    n = WORLD * IMAGES_PER_RANK * VIEWS
    x = torch.randn(n, DIM_IN, generator=gen, dtype=torch.float64)
    w = torch.randn(DIM_IN, DIM, generator=gen, dtype=torch.float64)
    t = F.normalize(torch.randn(n, DIM, generator=gen, dtype=torch.float64), dim=-1)
    labels = torch.arange(WORLD * IMAGES_PER_RANK).repeat_interleave(VIEWS)
    return x, w, t, labels


def paper_loss(batch: Embeddings) -> torch.Tensor:
    """The ts_aug objective: absolute + lam-1 * relative s-t + lam-2 * relative s-s."""
    return (absolute_loss(batch.student, batch.teacher)
            + 0.7 * relative_loss(batch.student, batch.teacher, batch.teacher, batch.groups)
            + 0.6 * relative_loss(batch.student, batch.student, batch.teacher, batch.groups))


def embed(x, w, t, labels, groups):
    return Embeddings(student=F.normalize(x @ w, dim=-1), labels=labels, teacher=t, groups=groups)


def _gather_worker(rank: int, world: int, port: int, out: str):
    info = _init(rank, world, port)
    x, w, t, labels = global_batch()
    w.requires_grad_(True)
    rows = slice(rank * IMAGES_PER_RANK * VIEWS, (rank + 1) * IMAGES_PER_RANK * VIEWS)
    local_groups = torch.arange(IMAGES_PER_RANK).repeat_interleave(VIEWS)  # per-rank image ids, as a mode makes them
    batch = gather_embeddings(embed(x[rows], w, t[rows], labels[rows], local_groups), info)
    loss = paper_loss(batch)
    loss.backward()
    grad = w.grad.clone()
    dist.all_reduce(grad)  # DDP: the mean of the ranks' gradients
    grad /= world
    mean_loss = all_reduce_mean(float(loss), info, "cpu")
    if rank == 0:
        torch.save({"grad": grad, "loss": float(loss), "mean_loss": mean_loss, "groups": batch.groups,
                    "labels": batch.labels, "student": batch.student.detach()}, out)
    del batch, loss
    leave()


def test_gathered_loss_gradient_equals_the_single_process_gradient(tmp_path):
    out = tmp_path / "gather.pt"
    mp.spawn(_gather_worker, args=(WORLD, free_port(), str(out)), nprocs=WORLD, join=True)
    got = torch.load(out, weights_only=True)

    x, w, t, labels = global_batch()
    w.requires_grad_(True)
    groups = torch.arange(WORLD * IMAGES_PER_RANK).repeat_interleave(VIEWS)
    batch = embed(x, w, t, labels, groups)
    loss = paper_loss(batch)
    loss.backward()
    assert torch.equal(got["groups"], groups), "group ids must be made unique across ranks"
    assert torch.equal(got["labels"], labels)
    torch.testing.assert_close(got["student"], batch.student.detach(), rtol=0, atol=1e-12)
    assert got["loss"] == pytest.approx(float(loss.detach()), rel=1e-12)
    assert got["mean_loss"] == pytest.approx(float(loss.detach()), rel=1e-12)
    assert w.grad.abs().max() > 1e-3  # a gradient that can differ
    torch.testing.assert_close(got["grad"], w.grad, rtol=1e-10, atol=1e-12)


def test_gather_is_the_identity_in_one_process():
    x, w, t, labels = global_batch()
    batch = embed(x, w, t, labels, None)
    assert gather_embeddings(batch, DistInfo()) is batch


# ---------------------------------------------------------------------------------------------------
# DDP training through main.main
# ---------------------------------------------------------------------------------------------------
def ddp_args(dataset: Path, run_dir: Path, teacher: Path):
    """Tiny ts_aug training, no test table (--test-datasets '')."""
    return ["--training-dataset", f"folder:{dataset}", "--test-datasets", "",
            "--directory", str(run_dir), "--student", "timm:resnet18", "--not-pretrained", "--whitening", "16",
            "--image-size", "32", "--teacher-image-size", "48", "--teacher-path", str(teacher), "--mode", "ts_aug",
            "--epochs", "2", "--query-size", "8", "--batch-size", "4", "--pos-num", "2", "--workers", "0",
            "--logger", "none", "--optimizer", "sgd", "--lr", "0.05", "--device", "cpu", "--no-val"]


def _main_worker(rank: int, world: int, port: int, argv):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import main as main_module

    main_module.main(argv)  # leaves the process group itself
    leave(barrier=False)


@pytest.fixture(scope="module")
def random_teacher(tmp_path_factory):
    from lib.checkpoint import atomic_save, network_state
    from lib.models.loading import get_network

    torch.manual_seed(3)
    net = get_network("timm:resnet18", pooling="gem", whitening=16, pretrained=False, image_size=48)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pth"
    atomic_save(network_state(net, epoch=0, mode="sym"), path)
    return path


def test_two_process_ddp_training_matches_one_process(tiny_dataset, tmp_path, random_teacher):
    from lib.checkpoint import load_checkpoint

    single, double = tmp_path / "one", tmp_path / "two"
    import main as main_module

    main_module.main(ddp_args(tiny_dataset, single, random_teacher))  # 1 process, here
    mp.spawn(_main_worker, args=(WORLD, free_port(), ddp_args(tiny_dataset, double, random_teacher)), nprocs=WORLD,
             join=True)
    a, b = load_checkpoint(single / "checkpoint_last.pth"), load_checkpoint(double / "checkpoint_last.pth")
    assert a["epoch"] == b["epoch"] == 2 and a["scheduler"]["last_epoch"] == 4  # 4 SGD steps
    la, lb = [h["train/loss"] for h in a["history"]], [h["train/loss"] for h in b["history"]]
    assert lb == pytest.approx(la, rel=1e-5)
    start = get_initial_student(a)
    moved = max(float((a["state_dict"][k].float() - start[k].float()).abs().max()) for k in start)
    assert moved > 1e-3, "training must move the weights for the comparison to mean anything"
    diff = {k: float((a["state_dict"][k].float() - b["state_dict"][k].float()).abs().max()) for k in a["state_dict"]}
    worst = max(diff, key=diff.get)
    (tmp_path / "ddp_diff.json").write_text(json.dumps({"max_abs_diff": diff[worst], "tensor": worst, "moved": moved}))
    print(f"DDP vs 1 process: max |dw| = {diff[worst]:.3g} ({worst}); max |w - w0| = {moved:.3g}")
    for k in a["state_dict"]:
        torch.testing.assert_close(b["state_dict"][k], a["state_dict"][k], rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL)


def get_initial_student(state):
    """The student at step 0: rebuilt with the run's seed as ``run_stage`` does."""
    from lib.models.loading import get_network
    from lib.utils import seed_everything

    cfg = state["config"]
    seed_everything(cfg["seed"])
    net = get_network(cfg["student"], None, pooling=cfg["pool"], whitening=cfg["whitening"], pretrained=False,
                      image_size=cfg["image_size"])
    return net.state_dict()


@pytest.mark.slow
def test_search_under_two_processes(tiny_dataset, tmp_path, random_teacher):
    """torchrun + --optimize: rank 0 runs the study, both ranks train every trial."""
    optuna = pytest.importorskip("optuna")
    run = tmp_path / "run"
    argv = [a for a in ddp_args(tiny_dataset, run, random_teacher) if a != "--no-val"]
    argv += ["--epochs", "1", "--optimize", "--trials", "2", "--search-only"]
    mp.spawn(_main_worker, args=(WORLD, free_port(), argv), nprocs=WORLD, join=True)
    study = optuna.load_study(study_name=run.name, storage=f"sqlite:///{run / 'study.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert all(0 <= t.value <= 1 and list(t.intermediate_values) == [1] for t in study.trials)
    assert all((run / "trials" / str(t.number) / "model_best.pth").is_file() for t in study.trials)
    assert json.loads((run / "study_best.json").read_text())["config"]["val"] is False
