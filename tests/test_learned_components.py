"""Training components that must act or be refused: the PADS miner's policy step, the mode weights
that --optimize searches."""
import pytest

import main as main_module
from lib.checkpoint import load_checkpoint
from lib.config import load_config
from tests.test_main import tiny_args

PADS = "triplet:1:miner=parametric"


def test_parametric_miner_takes_a_policy_step_after_each_validation(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    main_module.main(tiny_args(tiny_dataset, run, "--mode", "sym", "--objective", PADS, "--samples-per-class", "2"))
    state = load_checkpoint(run / "checkpoint_last.pth")
    miner = {k.split("miner.")[1]: v for k, v in state["objectives"].items() if ".miner." in k}
    # every update consumes the negatives drawn since the previous one: none are left at the end
    assert miner["bin_counts"].sum() == 0
    scores = [state["start_val"]["score"]] + [h["val/score"] for h in state["history"]]
    rewards = [h["train/triplet_miner_reward"] for h in state["history"]]
    assert rewards == pytest.approx([b - a for a, b in zip(scores, scores[1:])], abs=1e-12)
    # the policy moved exactly when a reward was non-zero (uniform start: logits 0)
    assert bool(miner["logits"].abs().sum() > 0) == any(r != 0 for r in rewards)
    assert miner["baseline"].item() != 0 or all(r == 0 for r in rewards)


def test_parametric_miner_without_validation_is_refused_up_front(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="learns from the change of the validation score.*--no-val"):
        main_module.main(tiny_args(tiny_dataset, run, "--mode", "sym", "--objective", PADS, "--no-val"))
    with pytest.raises(ValueError, match="--optimize: the final run trains on train\\+val without validation"):
        main_module.main(tiny_args(tiny_dataset, run, "--mode", "sym", "--objective", PADS, "--optimize"))
    assert not (run / "config.json").exists()  # refused before anything was written


def test_searching_a_weight_that_an_objective_spec_replaces_is_refused():
    from lib.hpo import search_space  # no optuna needed: the space is declared, not sampled

    with pytest.raises(ValueError, match="searches lam_1 .* would never reach the loss"):
        search_space(load_config(["--optimize", "--objective", "relative_st:0.3"]))
    with pytest.raises(ValueError, match="searches lam_2"):
        search_space(load_config(["--optimize", "--objective", "relative_ss:0.3", "--search", "lam_1=off"]))
    with pytest.raises(ValueError, match="searches lam_csd .*'csd'"):
        search_space(load_config(["--optimize", "--objective", "csd:2", "--search", "lam_csd=0.5:2"]))
    # the spec's own weight is searchable, and the mode weights of other modes are not concerned
    cfg = load_config(["--optimize", "--objective", "relative_st:0.3", "--search", "lam_1=off",
                       "--search", "objective.relative_st.weight=0.1:0.5"])
    assert [p.name for p in search_space(cfg)] == ["lr", "lam_2", "objective.relative_st.weight"]
    assert [p.name for p in search_space(load_config(["--mode", "ts_reg", "--objective", "relative_st:0.3"]))] == ["lr"]
