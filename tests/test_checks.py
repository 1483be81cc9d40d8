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
