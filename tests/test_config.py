"""Configuration: flags, YAML, seed flag names, every shipped experiment config parses."""
import re
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
    assert load_config([]).val is False and load_config(["--val"]).val is True and load_config(["--wd", "0.1"]).weight_decay == 0.1


def test_bad_config_names_the_problem(tmp_path):
    (tmp_path / "bad.yaml").write_text("learning_rat: 1\n")
    with pytest.raises(ValueError, match="learning_rat"):
        load_config(["--config", str(tmp_path / "bad.yaml")])
    with pytest.raises(ValueError, match="option mode \\(--mode\\) = 'triplet': is not one of"):
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


@pytest.mark.parametrize("flags, option", [
    (["--epochs", "-1"], "--epochs"), (["--batch-size", "0"], "--batch-size"), (["--image-size", "0"], "--image-size"),
    (["--teacher-image-size", "0"], "--teacher-image-size"), (["--query-size", "0"], "--query-size"),
    (["--pos-num", "0"], "--pos-num"), (["--val-ratio", "1.5"], "--val-ratio"), (["--lr=-1e-3"], "--lr"),
    (["--lr", "0"], "--lr"), (["--teacher-lr=-1"], "--teacher-lr"), (["--crop-scale", "0"], "--crop-scale"),
    (["--workers", "-1"], "--workers"), (["--update-every", "0"], "--update-every"), (["--neg-num", "-2"], "--neg-num"),
    (["--samples-per-class", "-1"], "--samples-per-class"), (["--lr", "nan"], "--lr"), (["--momentum", "1"], "--momentum"),
])
def test_out_of_range_flags_name_the_option(flags, option):
    with pytest.raises(ValueError, match=f"command line: option .*\\({option}\\) = .*(must be|finite)"):
        load_config(flags)


@pytest.mark.parametrize("text, option, problem", [
    ("lr: abc\n", "--lr", "expected a number"), ('epochs: "3"\n', "--epochs", "expected an integer.*remove the quotes"),
    ("epochs: 2.5\n", "--epochs", "expected an integer"), ("batch_size: 0\n", "--batch-size", ">= 1"),
    ("val: 1\n", "--val", "true or false"), ("lr: [1, 2]\n", "--lr", "expected a number"),
    ("weight_decay: -1.0e-6\n", "--weight-decay", ">= 0.0"), ("image_size:\n", "--image-size", "got nothing"),
])
def test_bad_yaml_values_name_the_file_and_option(tmp_path, text, option, problem):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"config file {path}: option .*\\({option}\\) = .*{problem}"):
        load_config(["--config", str(path)])


def test_yaml_numbers_that_yaml_reads_as_text_are_accepted(tmp_path):
    (tmp_path / "c.yaml").write_text("lr: 1e-4\nlam_1: 1\ngpu_id: 0\n")  # PyYAML reads 1e-4 (no dot) as a string
    cfg = load_config(["--config", str(tmp_path / "c.yaml")])
    assert cfg.lr == 1e-4 and isinstance(cfg.lam_1, float) and cfg.gpu_id == "0"


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("lr: 1.0e-4\nepochs: 3\n  batch_size: [8\n")
    with pytest.raises(ValueError, match=f"config file {path} line 3, column .*YAML syntax error"):
        load_config(["--config", str(path)])


def test_test_py_options_are_checked_by_the_parser(capsys):
    import test as test_module

    for flags, message in [(["--image-size", "0"], "argument --image-size/-imsize: must be >= 1"),
                           (["--batch-size", "0"], "argument --batch-size: must be >= 1"),
                           (["--val-ratio", "1.5"], "argument --val-ratio: must be >= 0.0 and < 1.0"),
                           (["--multiscale", "[1, 0]"], "--multiscale '\\[1, 0\\]': scales must be positive"),
                           (["--multiscale", "[1, 1/0]"], "--multiscale '\\[1, 1/0\\]': expected a list of numbers")]:
        with pytest.raises(SystemExit):
            test_module.main(["--student", "resnet18", *flags])
        assert re.search(message, capsys.readouterr().err), (flags, message)


def test_multiscale_rejects_empty_and_infinite():
    for text in ("[]", "[1, 1e400]", "[1, 1/0]"):
        with pytest.raises(ValueError, match="--multiscale"):
            parse_scales(text)
