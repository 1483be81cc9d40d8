"""Configuration: flags, YAML, seed flag names, every shipped experiment config parses."""
from pathlib import Path

import pytest

from lib.config import Config, load_config, make_config, read_yaml
from lib.utils import parse_scales

ROOT = Path(__file__).resolve().parents[1]


def test_flags_override_yaml_and_defaults(tmp_path):
    (tmp_path / "c.yaml").write_text("lr: 2.0e-4\nlam-1: 0.6\nobjective:\n  - sec:0.1\n")
    cfg = load_config(["--config", str(tmp_path / "c.yaml"), "--lam-1", "0.8", "--no-val", "--not-pretrained",
                       "-d", "cub", "--objective", "ms:0.5"])
    assert cfg.lr == 2e-4 and cfg.lam_1 == 0.8 and cfg.val is False and cfg.pretrained is False
    assert cfg.training_dataset == "cub" and cfg.objective == ["ms:0.5"]
    assert load_config([]).val is True and load_config(["--wd", "0.1"]).weight_decay == 0.1


def test_bad_config_names_the_problem(tmp_path):
    (tmp_path / "bad.yaml").write_text("learning_rat: 1\n")
    with pytest.raises(ValueError, match="learning_rat"):
        load_config(["--config", str(tmp_path / "bad.yaml")])
    with pytest.raises(ValueError, match="mode='triplet'"):
        make_config({"mode": "triplet"})
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="list.yaml"):
        read_yaml(tmp_path / "list.yaml")
    with pytest.raises(SystemExit):
        load_config(["--mode", "triplet"])


@pytest.mark.parametrize("path", sorted((ROOT / "experiments").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_experiment_config_parses(path):
    from lib.losses import build_objective

    cfg = make_config(read_yaml(path), source=str(path))
    assert isinstance(cfg, Config)
    for spec in cfg.objective:  # every objective and parameter named in the file exists
        build_objective(spec, embedding_dim=cfg.whitening or 32, num_classes=10)


def test_multiscale_parsing_without_eval():
    assert parse_scales("[1, 1/2**(1/2), 1/2]") == pytest.approx([1, 2 ** -0.5, 0.5])
    with pytest.raises(ValueError, match="multiscale"):
        parse_scales("[__import__('os')]")
    with pytest.raises(ValueError, match="positive"):
        parse_scales("[0]")
