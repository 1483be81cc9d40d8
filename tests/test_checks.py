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
