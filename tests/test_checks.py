"""Issue 10, the first half: wrong results with exit code 0 and errors that do not name the option.

Each test injects one fault (a path alias, a test set without positives, a class smaller than K, a
flipped checkpoint byte, a killed write, a resume with other flags, ...) and checks the clear error
or the correct behaviour that replaced the silent wrong result."""
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from lib.evaluation.protocol import evaluate_settings, format_table
from lib.utils import dumps_json, write_json


def _strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


# ---------------------------------------------------------------------------------------------------
# 3. test sets without positives; strict JSON
# ---------------------------------------------------------------------------------------------------

def test_json_is_strict_nan_and_inf_become_null(tmp_path):
    obj = {"mAP": float("nan"), "rows": [1.5, float("inf"), np.float32("nan"), torch.tensor(float("-inf"))],
           "ok": np.float64(0.25), "n": np.int64(3)}
    write_json(obj, tmp_path / "r.json")
    back = _strict_json((tmp_path / "r.json").read_text())
    assert back == {"mAP": None, "rows": [1.5, None, None, None], "ok": 0.25, "n": 3}
    assert _strict_json(dumps_json(obj)) == back
    assert not list(tmp_path.glob(".*tmp"))  # written through a temporary file that is gone


def test_queries_without_positive_are_counted_in_the_table():
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(7, 8), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3])  # classes 2 and 3: one image each, no positive
    rows = evaluate_settings({"e": emb}, labels, {"sym": ("e", "e")})
    assert rows["sym"]["num_queries"] == 5 and rows["sym"]["num_queries_without_positives"] == 2
    assert math.isfinite(rows["sym"]["mAP"])
    assert "2 of 7 queries have no positive" in format_table(rows, title="t")
    assert "no positive" not in format_table(evaluate_settings({"e": emb[:5]}, labels[:5], {"sym": ("e", "e")}))


@pytest.mark.parametrize("labels", [[0, 1, 2, 3], [0]], ids=["singletons", "one-image"])
def test_a_test_set_where_no_query_has_a_positive_fails_clearly(labels):
    emb = torch.nn.functional.normalize(torch.randn(len(labels), 8), dim=1)
    with pytest.raises(ValueError, match=f"none of the {len(labels)} queries has a positive"):
        evaluate_settings({"e": emb}, torch.tensor(labels), {"sym": ("e", "e")})


# ---------------------------------------------------------------------------------------------------
# 1. split paths: aliases, paths that leave the root; 6. unreadable images found when the split loads
# ---------------------------------------------------------------------------------------------------

def _png(path: Path, value: int = 0) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)
    return path


@pytest.fixture()
def split_root(tmp_path):
    for c in "abcd":
        for i in range(2):
            _png(tmp_path / "data" / c / f"{i}.png", 10 * i)
    return tmp_path


def _split_file(root: Path, train, test, **extra) -> str:
    path = root / "split.json"
    path.write_text(json.dumps({"train": train, "val": [], "test": test, "val_ratio": 0.5, **extra}))
    return str(path)


@pytest.mark.parametrize("train, test, message", [
    ([["a/0.png", "a/1.png"]], [["./a/0.png", "b/0.png"]], r"'./a/0.png' is in subset 'train' class 0 \(there as 'a/0.png'\) and in subset 'test' class 0"),
    ([["a/0.png", "a/1.png"]], [["b/0.png", "b/../a/1.png"]], r"'b/../a/1.png' is in subset 'train' class 0 \(there as 'a/1.png'\) and in subset 'test'"),
    ([["a/0.png", "a/1.png"]], [["b//0.png", "b/1.png"], ["b/0.png", "c/0.png"]],
     r"subset 'test' holds 'b/0.png' twice \(as 'b//0.png' and 'b/0.png'\) \(classes 0 and 1\)"),
])
def test_path_aliases_fail_the_leakage_and_duplicate_checks(split_root, train, test, message):
    from lib.data.splits import load_split

    with pytest.raises(ValueError, match=message):
        load_split(_split_file(split_root, train, test), str(split_root / "data"))


def test_paths_that_leave_the_root_are_refused_unless_absolute(split_root):
    from lib.data.splits import load_split

    outside = _png(split_root / "elsewhere" / "x.png")
    data = str(split_root / "data")
    with pytest.raises(ValueError, match=r"subset 'test' class 0: image path '../elsewhere/x.png' leaves the dataset root"):
        load_split(_split_file(split_root, [["a/0.png", "a/1.png"]], [["../elsewhere/x.png", "b/0.png"]]), data)
    with pytest.raises(ValueError, match=r"'c/../../etc/x' leaves the dataset root"):
        load_split(_split_file(split_root, [["a/0.png", "c/../../etc/x"]], [["b/0.png", "b/1.png"]]), data)
    # an absolute path is taken as it is, and its aliases are caught too
    split = load_split(_split_file(split_root, [["a/0.png", "a/1.png"]], [[str(outside), "b/0.png"]]), data)
    assert split.subset("test")[0] == [str(outside), str(split_root / "data" / "b" / "0.png")]
    with pytest.raises(ValueError, match="classes must be disjoint"):
        load_split(_split_file(split_root, [["a/0.png", str(split_root / "data" / "b" / ".") + "/0.png"]],
                               [["b/0.png", "b/1.png"]]), data)


def test_subset_paths_are_normalised(split_root):
    from lib.data.splits import load_split

    split = load_split(_split_file(split_root, [["./a/0.png", "a//1.png"]], [["b/0.png", "b/1.png"]]),
                       str(split_root / "data"))
    assert split.subset("train")[0] == [str(split_root / "data" / "a" / n) for n in ("0.png", "1.png")]


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n\x00\x00"], ids=["empty", "text", "cut-header"])
def test_unreadable_images_are_found_when_the_split_loads(split_root, content):
    from lib.data.splits import load_split

    (split_root / "data" / "c" / "1.png").write_bytes(content)
    with pytest.raises(ValueError, match=r"subset 'test' class 1: image 'c/1.png' under root .* is not a readable image"):
        load_split(_split_file(split_root, [["a/0.png", "a/1.png"]], [["b/0.png", "b/1.png"], ["c/0.png", "c/1.png"]]),
                   str(split_root / "data"))


# ---------------------------------------------------------------------------------------------------
# 5. checkpoints: content checksum, old checkpoints, a killed write's temporary file
# ---------------------------------------------------------------------------------------------------

def _training_like_state():
    torch.manual_seed(0)
    net = torch.nn.Linear(64, 32)
    opt = torch.optim.AdamW(net.parameters())
    net(torch.randn(4, 64)).sum().backward()
    opt.step()
    return {"meta": {"architecture": "x"}, "state_dict": net.state_dict(), "optimizer": opt.state_dict(),
            "epoch": 3, "history": [{"train/loss": 0.5}], "rng": {"torch": torch.get_rng_state()}}


def _flip_inside_tensor_data(path: Path, count: int = 64) -> str:
    """Flip ``count`` bytes in the middle of the largest tensor's storage (stored uncompressed in the zip)."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        entry = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = int.from_bytes(raw[entry.header_offset + 26:entry.header_offset + 28], "little"), \
        int.from_bytes(raw[entry.header_offset + 28:entry.header_offset + 30], "little")
    start = entry.header_offset + 30 + name_len + extra_len + entry.file_size // 2 - count // 2
    raw[start:start + count] = bytes(b ^ 0xFF for b in raw[start:start + count])
    path.write_bytes(bytes(raw))
    return entry.filename


def test_flipped_bytes_in_a_checkpoint_are_found_on_load(tmp_path):
    from lib.checkpoint import atomic_save, load_checkpoint

    path = tmp_path / "checkpoint_last.pth"
    state = _training_like_state()
    atomic_save(state, path)
    back = load_checkpoint(path)
    assert "checksum" not in back and back["epoch"] == 3
    assert torch.equal(back["state_dict"]["weight"], state["state_dict"]["weight"])
    _flip_inside_tensor_data(path)
    torch.load(path, weights_only=True)  # torch itself reads the damaged file without complaint
    with pytest.raises(ValueError, match=f"checkpoint {re.escape(str(path))} is corrupt"):
        load_checkpoint(path)


def test_checksum_covers_plain_data_too():
    from lib.checkpoint import content_checksum

    state = _training_like_state()
    base = content_checksum(state)
    assert content_checksum({**state, "epoch": 4}) != base
    assert content_checksum({**state, "history": [{"train/loss": 0.5000001}]}) != base
    assert content_checksum({**state, "history": ({"train/loss": 0.5},)}) != base  # tuple, not list
    assert content_checksum(dict(state)) == base


def test_checkpoints_without_a_checksum_still_load_with_a_warning(tmp_path):
    from lib.checkpoint import load_checkpoint

    path = tmp_path / "old.pth"
    torch.save(_training_like_state(), path)
    with pytest.warns(UserWarning, match="has no content checksum .* loaded without verification"):
        assert load_checkpoint(path)["epoch"] == 3


def test_a_killed_write_leaves_a_temporary_file_that_the_next_write_removes(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[1]
    target = tmp_path / "checkpoint_last.pth"
    code = ("import sys, time; sys.path.insert(0, %r)\n"
            "from lib.utils import atomic_write\n"
            "def slow(tmp):\n    open(tmp, 'wb').write(b'partial'); print('writing', flush=True); time.sleep(60)\n"
            "atomic_write(%r, slow)\n") % (str(root), str(target))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    live = list(tmp_path.glob(".checkpoint_last.pth.*.tmp"))
    assert len(live) == 1 and str(proc.pid) in live[0].name
    from lib.checkpoint import atomic_save, load_checkpoint

    other = tmp_path / ".checkpoint_last.pth.1.keep.tmp.bak"  # not a temporary file of ours: untouched
    other.write_bytes(b"x")
    atomic_save({"epoch": 1}, tmp_path / "model_best.pth")  # another file's write leaves it alone
    atomic_save({"epoch": 1}, target)  # the writer is alive: its temporary file stays
    assert live[0].exists()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert live[0].exists()
    atomic_save({"epoch": 2}, target)
    assert not live[0].exists() and other.exists()
    assert load_checkpoint(target)["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, "model_best.pth", other.name])


# ---------------------------------------------------------------------------------------------------
# 4. classes smaller than K train; --samples-per-class reaches the teacher stage
# ---------------------------------------------------------------------------------------------------

def tiny_args(dataset: Path, run_dir: Path, *extra: str):
    return ["--training-dataset", f"folder:{dataset}", "--test-datasets", f"folder:{dataset}-test",
            "--directory", str(run_dir), "--student", "timm:resnet18", "--not-pretrained", "--whitening", "16",
            "--image-size", "32", "--teacher-image-size", "48", "--epochs", "1", "--query-size", "8",
            "--batch-size", "4", "--pos-num", "2", "--workers", "0", "--logger", "none", "--teacher-epochs", "1",
            "--lr", "1e-3", "--teacher-lr", "1e-3", "--pool-size", "8", "--neg-num", "2", "--val", *extra]


@pytest.fixture(scope="module")
def pairs_dataset(tmp_path_factory):
    from conftest import make_class_folder

    return make_class_folder(tmp_path_factory.mktemp("pairs") / "images", num_classes=8, per_class=2, seed=3)


def test_a_set_of_two_images_per_class_trains_its_teacher_and_student(pairs_dataset, tmp_path, capsys):
    import main as main_module

    run = tmp_path / "run"
    main_module.main(tiny_args(pairs_dataset, run))  # before: "only 0 classes have >= 4 images"
    log = capsys.readouterr().out
    assert "2 classes have fewer than 4 images (2): their batches hold each of their images" in log
    teacher_cfg = json.loads((run / "teacher" / "config.json").read_text())
    assert teacher_cfg["samples_per_class"] == 4 and teacher_cfg["mode"] == "sym"
    assert (run / "teacher" / "model_best.pth").is_file() and (run / "results.json").is_file()

    run2 = tmp_path / "run2"
    main_module.main(tiny_args(pairs_dataset, run2, "--samples-per-class", "2", "--teacher-batch-size", "4"))
    log = capsys.readouterr().out
    assert json.loads((run2 / "teacher" / "config.json").read_text())["samples_per_class"] == 2
    assert "class-balanced batches of 2 classes x 2 images from 2 classes" in log and "fewer than" not in log

    # changing a teacher-stage flag on resume is refused up front, naming the flag
    before = (run / "config.json").read_text()
    with pytest.raises(ValueError, match=r"--teacher-epochs 2 \(checkpoint: 1\)"):
        main_module.main(tiny_args(pairs_dataset, run, "--teacher-epochs", "2", "--resume-student", "last"))
    assert (run / "config.json").read_text() == before


def test_a_bad_dataset_is_refused_before_the_run_directory_and_the_training(tiny_dataset, tmp_path):
    """A misspelt --test-datasets used to surface at the final table, after the whole training; a bad
    --training-dataset left a run directory holding only its config.json."""
    import main as main_module

    run = tmp_path / "run"
    with pytest.raises(ValueError, match=r"--test-datasets 'no-such-set-test': unknown dataset 'no-such-set'"):
        main_module.main(tiny_args(tiny_dataset, run, "--test-datasets", f"folder:{tiny_dataset}-test,no-such-set-test"))
    with pytest.raises(ValueError, match=r"--test-datasets 'folder:.*-gallery': .* has no subset 'gallery'"):
        main_module.main(tiny_args(tiny_dataset, run, "--test-datasets", f"folder:{tiny_dataset}-gallery"))
    with pytest.raises(FileNotFoundError, match=r"--training-dataset 'folder:.*no-such-folder': dataset folder"):
        main_module.main(tiny_args(tiny_dataset, run, "--training-dataset", f"folder:{tmp_path / 'no-such-folder'}"))
    assert not run.exists()


# ---------------------------------------------------------------------------------------------------
# 2. --overwrite and resume never mix two runs; a failed start does not lock its directory
# ---------------------------------------------------------------------------------------------------

def _sym_args(dataset, run, *extra):
    return tiny_args(dataset, run, "--mode", "sym", "--test-datasets", "", *extra)


def test_overwrite_moves_the_old_run_aside_and_a_failed_start_does_not_lock(tiny_dataset, tmp_path):
    import main as main_module
    from lib.checkpoint import load_checkpoint

    run = tmp_path / "run"
    main_module.main(_sym_args(tiny_dataset, run))
    old_weights = load_checkpoint(run / "checkpoint_last.pth")["state_dict"]
    # an --overwrite run that fails at start-up (no such student checkpoint) after the directory was prepared
    with pytest.raises(Exception, match="no-such.pth"):
        main_module.main(_sym_args(tiny_dataset, run, "--overwrite", "--student-path", str(tmp_path / "no-such.pth")))
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1, "the old run must be moved aside, whole"
    assert {p.name for p in aside[0].iterdir()} >= {"config.json", "checkpoint_last.pth", "model_best.pth", "results.json"}
    assert torch.equal(load_checkpoint(aside[0] / "checkpoint_last.pth")["state_dict"]["whiten.weight"],
                       old_weights["whiten.weight"])
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]  # nothing of the old run beside the new config
    # the failed start left only its config.json: the corrected command runs there without --overwrite
    main_module.main(_sym_args(tiny_dataset, run, "--lr", "2e-3"))
    assert json.loads((run / "config.json").read_text())["lr"] == 2e-3 and (run / "results.json").is_file()
    with pytest.raises(FileExistsError, match="already holds a run"):
        main_module.main(_sym_args(tiny_dataset, run))


def test_resume_checks_its_options_against_the_checkpoint_up_front(tiny_dataset, tmp_path):
    import main as main_module

    run = tmp_path / "run"
    main_module.main(_sym_args(tiny_dataset, run))
    before = (run / "config.json").read_text()
    with pytest.raises(ValueError, match=r"options differ from the checkpoint's: --epochs 3 \(checkpoint: 1\), "
                                         r"--lr 0.01 \(checkpoint: 0.001\); the checkpoint is at epoch 1: more epochs "
                                         r"only with --scheduler exponential or none"):
        main_module.main(_sym_args(tiny_dataset, run, "--epochs", "3", "--lr", "1e-2", "--resume-student", "last"))
    assert (run / "config.json").read_text() == before  # refused before anything was written
    # a network-only checkpoint is not a training checkpoint
    with pytest.raises(ValueError, match=r"model_best.pth: this is a network checkpoint \(weights and metadata only\), "
                                         "not a training checkpoint"):
        main_module.main(_sym_args(tiny_dataset, run, "--resume-student", str(run / "model_best.pth")))
    assert (run / "config.json").read_text() == before
    # what may change does: the workers, the logger
    main_module.main(_sym_args(tiny_dataset, run, "--resume-student", "last", "--print-freq", "3"))


def test_more_epochs_on_resume_with_a_schedule_that_allows_it_equals_the_longer_run(tiny_dataset, tmp_path):
    import main as main_module
    from lib.checkpoint import load_checkpoint

    exp = ("--scheduler", "exponential")
    main_module.main(_sym_args(tiny_dataset, tmp_path / "straight", *exp, "--epochs", "2"))
    main_module.main(_sym_args(tiny_dataset, tmp_path / "extended", *exp, "--epochs", "1"))
    main_module.main(_sym_args(tiny_dataset, tmp_path / "extended", *exp, "--epochs", "2", "--resume-student", "last"))
    a = load_checkpoint(tmp_path / "straight" / "checkpoint_last.pth")
    b = load_checkpoint(tmp_path / "extended" / "checkpoint_last.pth")
    assert a["epoch"] == b["epoch"] == 2
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]
    for name, tensor in a["state_dict"].items():
        assert torch.allclose(tensor, b["state_dict"][name], atol=1e-6, rtol=0), name
