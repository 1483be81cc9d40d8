"""optuna search (lib/hpo/): declared space, SQLite storage, resume, workers sharing one study,
failed/pruned/killed trials, summary and plots; end to end through main.py on tiny images.

Most cases drive ``optimize`` with a fake ``run_stage`` that behaves like the trainer (reports a
validation score per epoch, asks the pruner) so they take a second; the end-to-end cases train for real.
Run as a script (``python tests/test_hpo.py worker ...``) this file is a search worker process.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lib.config import load_config, make_config  # noqa: E402
from lib.distributed import DistInfo  # noqa: E402

try:  # the search-space tests need no optuna (lib.hpo imports it only to run a study); the study tests do
    import optuna
except ImportError:
    optuna = None
import lib.hpo as hpo  # noqa: E402
from lib.hpo import SearchParam, config_changes, optimize, parse_search, search_space  # noqa: E402

needs_optuna = pytest.mark.skipif(optuna is None, reason="optuna is not installed: the study tests need it")
State = optuna.trial.TrialState if optuna is not None else None


# ---------------------------------------------------------------------------------------------------
# a fake training stage: the trainer's contract, no network
# ---------------------------------------------------------------------------------------------------
def fake_score(cfg) -> float:
    """Peaks at the paper's CUB values (lr 1.4e-4, lam-1 0.77, lam-2 0.67)."""
    return 0.5 - abs(math.log(cfg.lr / 1.4e-4)) - abs(cfg.lam_1 - 0.77) - abs(cfg.lam_2 - 0.67)


def make_stage(fail_on=(), kill_on=(), sleep: float = 0.0, epochs: int = 2, calls=None):
    def run_stage(cfg, run_dir, split, teacher, *, trial=None, tag="", device=None, teacher_device=None, info=None,
                  cache=None):
        number = int(Path(run_dir).name)
        if calls is not None:
            calls.append((number, cfg))
        assert cfg.val is True and Path(cfg.directory) == Path(run_dir) and not cfg.optimize
        if number in kill_on:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(sleep)
        if number in fail_on:
            raise FloatingPointError("non-finite loss at epoch 1, batch 1: absolute=nan")
        score = fake_score(cfg)
        for epoch in range(1, epochs + 1):
            if trial is not None:
                trial.report(score - (epochs - epoch) * 0.01, epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at epoch {epoch}")
        return SimpleNamespace(best_score=score, best_epoch=epochs)

    return run_stage


def search_cfg(run_dir: Path, trials: int, **extra):
    values = dict(optimize=True, trials=trials, logger="none", directory=str(run_dir), mode="ts_aug")
    values.update(extra)
    return make_config(values)


def run_search(cfg, run_dir, stage, **kw):
    return optimize(cfg, run_dir, None, None, run_stage=stage, device="cpu", teacher_device="cpu", info=DistInfo(),
                    cache=None, **kw)


def load_study(run_dir: Path, name=None):
    return optuna.load_study(study_name=name or run_dir.name, storage=f"sqlite:///{run_dir / 'study.db'}")


# ---------------------------------------------------------------------------------------------------
# the search space
# ---------------------------------------------------------------------------------------------------
def test_default_space_is_the_papers_and_flags_extend_it():
    space = search_space(load_config([]))
    assert space == [SearchParam("lr", 1e-4, 2e-4, log=True), SearchParam("lam_1", 0.6, 0.8),
                     SearchParam("lam_2", 0.6, 0.8)]
    assert [p.name for p in search_space(load_config(["--mode", "sym"]))] == ["lr"]
    cfg = load_config(["--search", "lr=1e-5:1e-3:log", "--search", "lam-2=off", "--search", "pos_num=2:8",
                       "--search", "weight_decay=1e-6:1e-4:log"])
    space = {p.name: p for p in search_space(cfg)}
    assert list(space) == ["lr", "lam_1", "pos_num", "weight_decay"]
    assert space["lr"] == SearchParam("lr", 1e-5, 1e-3, log=True)
    assert space["pos_num"].integer and not space["lr"].integer
    assert parse_search(["lr=1e-5:1e-3:log", {"lam-1": "off", "objective.ms.low-k": [1, 5, "int"]}]) == {
        "lr": SearchParam("lr", 1e-5, 1e-3, log=True), "lam_1": None,
        "objective.ms.low_k": SearchParam("objective.ms.low_k", 1, 5, integer=True)}


def test_yaml_search_mapping(tmp_path):
    (tmp_path / "c.yaml").write_text("optimize: true\nsearch:\n  lr: [1.0e-5, 1.0e-3, log]\n  lam_1: off\n"
                                     "  mixup_alpha: {low: 0.1, high: 0.4}\n")
    space = {p.name: p for p in search_space(load_config(["--config", str(tmp_path / "c.yaml")]))}
    assert space == {"lr": SearchParam("lr", 1e-5, 1e-3, log=True), "lam_2": SearchParam("lam_2", 0.6, 0.8),
                     "mixup_alpha": SearchParam("mixup_alpha", 0.1, 0.4)}


@pytest.mark.parametrize("entry, message", [
    ("learning_rate=1:2", "not a numeric option"), ("mode=1:2", "not a numeric option"),
    ("lr=2e-4:1e-4", "must be below"), ("lr=0:1:log", "low > 0"), ("lr=1e-4", "LOW:HIGH"),
    ("lr=a:b", "not a number"), ("lr=1:2:cubic", "unknown flag"), ("pos_num=1.5:4", "integer bounds"),
    ("objective.ms.alpha=1:2", "no --objective named 'ms'"), ("objective.absolute.alpha=1:2", "no parameter 'alpha'"),
    ("objective.3.weight=0:1", "1 --objective"), ("lr", "PARAM=LOW:HIGH"),
])
def test_bad_search_entries_name_the_problem(entry, message):
    cfg = load_config(["--search", entry, "--objective", "absolute:0.5"])
    with pytest.raises(ValueError, match=message):
        search_space(cfg)


def test_objective_parameters_are_written_into_the_spec_strings():
    cfg = load_config(["--objective", "mined_triplet:0.5:margin=0.7", "--objective", "absolute",
                       "--search", "objective.mined_triplet.margin=0.1:0.9", "--search", "objective.1.weight=0.1:2"])
    names = [p.name for p in search_space(cfg)]
    assert names[-2:] == ["objective.mined_triplet.margin", "objective.1.weight"]
    assert hpo.current_value(cfg, "objective.mined_triplet.margin") == 0.7
    assert hpo.current_value(cfg, "objective.1.weight") == 1.0
    changes = config_changes(cfg, {"lr": 1.2e-4, "objective.mined_triplet.margin": 0.25, "objective.1.weight": 0.3})
    assert changes == {"lr": 1.2e-4, "objective": ["mined_triplet:0.5:margin=0.25", "absolute:0.3"]}
    assert cfg.objective == ["mined_triplet:0.5:margin=0.7", "absolute"]  # not mutated
    from lib.losses import parse_objective_spec

    assert parse_objective_spec(changes["objective"][0]).params == {"margin": 0.25}
    # a parameter left at its constructor default: the default is the configured value
    cfg = load_config(["--objective", "mined_triplet", "--search", "objective.mined_triplet.margin=0.1:0.9"])
    assert hpo.current_value(cfg, "objective.mined_triplet.margin") == 0.7


# ---------------------------------------------------------------------------------------------------
# the study: storage, resume, failures, pruning, workers
# ---------------------------------------------------------------------------------------------------
@needs_optuna
def test_search_resumes_without_repeating_trials_and_writes_its_summary(tmp_path):
    run = tmp_path / "run"
    calls = []
    cfg = search_cfg(run, 2)
    best = run_search(cfg, run, make_stage(calls=calls))
    study = load_study(run)
    assert [t.state for t in study.trials] == [State.COMPLETE] * 2
    # the first trial is the configured values, enqueued once
    assert study.trials[0].params == {"lr": cfg.lr, "lam_1": cfg.lam_1, "lam_2": cfg.lam_2}
    assert calls[0][1].lr == cfg.lr and calls[0][1].directory == str(run / "trials" / "0")
    assert best["val"] is False and set(best) == {"lr", "lam_1", "lam_2", "val"}
    # without --resume an existing study is refused
    with pytest.raises(ValueError, match="--resume"):
        run_search(search_cfg(run, 3), run, make_stage())
    run_search(search_cfg(run, 3, resume=True), run, make_stage(calls=calls))
    study = load_study(run)
    assert [t.state for t in study.trials] == [State.COMPLETE] * 3 and len(calls) == 3
    assert sum(bool(t.user_attrs.get("initial")) for t in study.trials) == 1
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 3
    # a finished study: --resume with the same --trials runs nothing
    best = run_search(search_cfg(run, 3, resume=True), run, make_stage(calls=calls))
    assert len(calls) == 3 and len(load_study(run).trials) == 3
    winner = max(study.trials, key=lambda t: t.value)
    assert best == {**winner.params, "val": False}
    assert json.loads((run / "study_best.json").read_text())["trial"] == winner.number
    for name in ("study_trials.csv", "study_summary.md", "optimization_history.png", "param_importances.png",
                 "intermediate_values.png"):
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    assert (run / "trials" / "2" / "trial.json").is_file()
    assert "| number | state | value | lr | lam_1 | lam_2 |" in (run / "study_summary.md").read_text()
    assert not [p for p in run.rglob("*") if p.suffix in (".pkl", ".pickle", ".pck")]


@needs_optuna
def test_resumed_search_proposes_what_an_uninterrupted_one_does(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run_search(search_cfg(whole, 4), whole, make_stage())
    run_search(search_cfg(parts, 2), parts, make_stage())
    run_search(search_cfg(parts, 4, resume=True), parts, make_stage())
    a, b = load_study(whole).trials, load_study(parts).trials
    assert [t.params for t in a] == [t.params for t in b]
    other = tmp_path / "other"
    run_search(search_cfg(other, 4, seed=7), other, make_stage())
    assert [t.params for t in load_study(other).trials][1:] != [t.params for t in a][1:]


@needs_optuna
def test_failing_trial_is_recorded_and_the_study_goes_on(tmp_path):
    run = tmp_path / "run"
    best = run_search(search_cfg(run, 3), run, make_stage(fail_on={1}))
    study = load_study(run)
    states = [t.state for t in study.trials]
    assert states == [State.COMPLETE, State.FAIL, State.COMPLETE, State.COMPLETE]
    assert "FloatingPointError" in study.trials[1].user_attrs["error"]
    assert "FloatingPointError" in (run / "trials" / "1" / "error.txt").read_text()
    assert best["val"] is False
    assert "FAIL" in (run / "study_trials.csv").read_text()


@needs_optuna
def test_every_trial_failing_stops_with_a_clear_error(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="no trial .* completed"):
        run_search(search_cfg(run, 2), run, make_stage(fail_on=set(range(10))))
    assert [t.state for t in load_study(run).trials] == [State.FAIL] * 2


@needs_optuna
def test_pruned_trials_are_recorded(tmp_path):
    run = tmp_path / "run"
    # prune every trial whose validation score falls below 0.3 at a reported epoch
    pruner = optuna.pruners.ThresholdPruner(lower=0.3)
    run_search(search_cfg(run, 4), run, make_stage(), pruner=pruner)
    study = load_study(run)
    by_state = {s: [t for t in study.trials if t.state == s] for s in (State.COMPLETE, State.PRUNED)}
    assert len(study.trials) == 4 and by_state[State.PRUNED] and by_state[State.COMPLETE]
    assert all(min(t.intermediate_values.values()) < 0.3 for t in by_state[State.PRUNED])
    assert all(len(t.intermediate_values) == 1 for t in by_state[State.PRUNED])  # stopped at epoch 1


@needs_optuna
def test_configured_pruners():
    assert isinstance(hpo.make_pruner("none", epochs=3), optuna.pruners.NopPruner)
    assert isinstance(hpo.make_pruner("median", epochs=3), optuna.pruners.MedianPruner)
    assert isinstance(hpo.make_pruner("hyperband", epochs=3), optuna.pruners.HyperbandPruner)
    with pytest.raises(SystemExit):
        load_config(["--pruner", "always"])


def _worker(run_dir: Path, trials: int, *extra: str, storage: str = "", name: str = "shared"):
    cmd = [sys.executable, str(Path(__file__).resolve()), "worker", str(run_dir), str(trials), storage, name, *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})


def _two_workers_share_one_study(tmp_path, storage: str, name: str = "shared"):
    workers = [_worker(tmp_path / f"w{i}", 6, "--sleep", "0.25", "--start-together", "2",
                       "--ready-dir", str(tmp_path / "ready"), storage=storage, name=name)
               for i in range(2)]
    outputs = [w.communicate(timeout=120)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs
    study = optuna.load_study(study_name=name, storage=storage)
    complete = [t for t in study.trials if t.state == State.COMPLETE]
    assert len(complete) == 6 and len({t.number for t in complete}) == 6
    assert all(t.state == State.COMPLETE or t.user_attrs.get("surplus") for t in study.trials)
    assert len({tuple(sorted(t.params.items())) for t in complete}) == 6  # no two draws alike
    assert sum(bool(t.user_attrs.get("initial")) for t in study.trials) == 1
    pids = {t.user_attrs["worker"]["pid"] for t in complete}
    assert len(pids) == 2, "both workers ran trials"
    ran = sorted(int(p.parent.name) for i in range(2) for p in (tmp_path / f"w{i}" / "trials").glob("*/trial.json"))
    assert ran == sorted(t.number for t in study.trials if not t.user_attrs.get("surplus"))


@needs_optuna
def test_two_workers_share_one_sqlite_study(tmp_path):
    _two_workers_share_one_study(tmp_path, f"sqlite:///{tmp_path / 'shared.db'}")


@pytest.fixture(scope="module")
def postgres_url():
    """A PostgreSQL server: ``RAML_TEST_POSTGRES_URL`` (``.ci/run`` starts one and sets it), else a
    throw-away cluster started here with ``.ci/postgres`` where Debian's postgresql is installed; the
    tests that need it are skipped, saying why, only where neither gives a server."""
    url, started = os.environ.get("RAML_TEST_POSTGRES_URL"), None
    if not url:
        proc = subprocess.run([str(ROOT / ".ci" / "postgres"), "start"], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip("no PostgreSQL server: RAML_TEST_POSTGRES_URL is not set and .ci/postgres could not start one "
                        f"({(proc.stderr or proc.stdout).strip()[-300:]}); install Debian's postgresql, or run .ci/run")
        values = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
        url, started = values["RAML_TEST_POSTGRES_URL"], values["RAML_TEST_POSTGRES_DIR"]
    try:
        import sqlalchemy

        sqlalchemy.create_engine(url).connect().close()
    except Exception as err:  # a server that was promised (the variable is set) and is not there is a failure
        if started:
            subprocess.run([str(ROOT / ".ci" / "postgres"), "stop", started], capture_output=True)
        pytest.fail(f"cannot reach the PostgreSQL server at {url}: {err}")
    yield url
    if started:
        subprocess.run([str(ROOT / ".ci" / "postgres"), "stop", started], capture_output=True, check=True)


@needs_optuna
def test_two_workers_share_one_postgresql_study(tmp_path, postgres_url):
    """README's ``--storage postgresql://...``: two search processes on a real server, as with SQLite."""
    import uuid

    _two_workers_share_one_study(tmp_path, postgres_url, name=f"shared-{uuid.uuid4().hex[:12]}")


@needs_optuna
def test_a_killed_search_resumes_and_retries_the_killed_trial(tmp_path):
    run = tmp_path / "run"
    worker = _worker(run, 3, "--kill-on", "1", storage=f"sqlite:///{run / 'study.db'}", name=run.name)
    worker.communicate(timeout=120)
    assert worker.returncode == -signal.SIGKILL
    study = load_study(run)
    assert [t.state for t in study.trials] == [State.COMPLETE, State.RUNNING]
    killed = study.trials[1].params
    best = run_search(search_cfg(run, 3, resume=True), run, make_stage())
    study = load_study(run)
    assert [t.state for t in study.trials] == [State.COMPLETE, State.FAIL, State.COMPLETE, State.COMPLETE]
    assert study.trials[2].params == killed and study.trials[2].user_attrs["retry_of"] == 1
    assert best["val"] is False


# ---------------------------------------------------------------------------------------------------
# end to end: main.py on tiny images
# ---------------------------------------------------------------------------------------------------
def tiny_args(dataset: Path, run_dir: Path, *extra: str):
    return ["--training-dataset", f"folder:{dataset}", "--test-datasets", f"folder:{dataset}-test",
            "--directory", str(run_dir), "--student", "timm:resnet18", "--not-pretrained", "--whitening", "16",
            "--image-size", "32", "--teacher-image-size", "48", "--epochs", "1", "--query-size", "8",
            "--batch-size", "4", "--pos-num", "2", "--workers", "0", "--logger", "none", "--teacher-epochs", "1",
            "--teacher-lr", "1e-3", "--mode", "ts_aug", "--val", *extra]


@pytest.fixture(scope="module")
def teacher_path(tiny_dataset, tmp_path_factory):
    import main as main_module  # the core: an import error must fail, not skip
    run = tmp_path_factory.mktemp("teacher") / "run"
    main_module.main(tiny_args(tiny_dataset, run, "--mode", "sym", "--image-size", "48", "--pool-size", "8",
                               "--neg-num", "2", "--lr", "1e-3"))
    return run / "model_best.pth"


@needs_optuna
@pytest.mark.slow  # ~35 s on 2 idle cores: 3 trials, a final run and the test table
def test_main_search_with_a_failed_trial_then_resume_and_final_run(tiny_dataset, tmp_path, teacher_path, monkeypatch):
    import main as main_module

    real = main_module.run_stage

    def flaky(cfg, run_dir, *a, **kw):
        if Path(run_dir).name == "1" and Path(run_dir).parent.name == "trials":
            raise FloatingPointError("non-finite loss at epoch 1, batch 1")
        return real(cfg, run_dir, *a, **kw)

    run = tmp_path / "run"
    args = tiny_args(tiny_dataset, run, "--teacher-path", str(teacher_path), "--optimize")
    monkeypatch.setattr(main_module, "run_stage", flaky)
    out = main_module.main(args + ["--trials", "2", "--search-only"])
    study = load_study(run)
    assert [t.state for t in study.trials] == [State.COMPLETE, State.FAIL, State.COMPLETE]
    assert "FloatingPointError" in study.trials[1].user_attrs["error"]
    assert all(0 <= t.value <= 1 and list(t.intermediate_values) == [1] for t in study.trials if t.value is not None)
    assert out["best"]["val"] is False and not (run / "results.json").exists()  # --search-only: no final run
    assert (run / "trials" / "2" / "model_best.pth").is_file()
    with pytest.raises(ValueError, match="--resume"):
        main_module.main(args + ["--trials", "3", "--overwrite"])
    monkeypatch.setattr(main_module, "run_stage", real)
    out = main_module.main(args + ["--trials", "3", "--resume"])
    study = load_study(run)
    assert [t.state for t in study.trials] == [State.COMPLETE, State.FAIL, State.COMPLETE, State.COMPLETE]
    assert [bool(t.user_attrs.get("initial")) for t in study.trials] == [True, False, False, False]
    final = json.loads((run / "config_final.json").read_text())
    assert final["val"] is False and {k: final[k] for k in study.best_params} == study.best_params
    assert out["best_val_score"] is None and out["test"]  # train+val without validation, then the test table
    for name in ("study_summary.md", "study_trials.csv", "study_best.json", "optimization_history.png",
                 "param_importances.png", "results.json"):
        assert (run / name).is_file(), name
    assert not [p for p in run.rglob("*") if p.suffix in (".pkl", ".pickle")]


@needs_optuna
def test_main_records_a_pruned_trial(tiny_dataset, tmp_path, teacher_path, monkeypatch):
    import main as main_module

    # the trainer reports the validation mAP of each epoch; a threshold above any mAP prunes at once
    monkeypatch.setattr(hpo, "make_pruner", lambda name, epochs: optuna.pruners.ThresholdPruner(lower=1.5)
                        if name == "median" else optuna.pruners.NopPruner())
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="no trial"):
        main_module.main(tiny_args(tiny_dataset, run, "--teacher-path", str(teacher_path), "--optimize",
                                   "--trials", "1", "--pruner", "median"))
    study = load_study(run)
    assert [t.state for t in study.trials] == [State.PRUNED]
    assert list(study.trials[0].intermediate_values) == [1]


def test_one_concern_per_module_and_the_old_imports_still_work():
    """lib.hpo is a package: the grammar, the storage, the liveness checks, the torchrun protocol and the
    reports each in their own module, the search loop in the package; ``from lib.hpo import ...`` works."""
    from lib.hpo import ddp, liveness, reports, space, storage

    assert hpo.search_space is space.search_space and hpo.parse_search is space.parse_search
    assert hpo.make_storage is storage.make_storage and hpo.make_sampler is storage.make_sampler
    assert hpo.fail_dead_trials is liveness.fail_dead_trials and hpo.write_summary is reports.write_summary
    assert callable(ddp._broadcast) and hpo.optimize.__module__ == "lib.hpo"
    for module in (space, storage, liveness, ddp, reports):  # optuna only inside functions: importable without it
        assert "\nimport optuna" not in open(module.__file__).read() and "\nfrom optuna" not in open(module.__file__).read()


# ---------------------------------------------------------------------------------------------------
# worker process entry point (for the cases above)
# ---------------------------------------------------------------------------------------------------
def _worker_main(argv):
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("trials", type=int)
    parser.add_argument("storage")
    parser.add_argument("name")
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--kill-on", type=int, nargs="*", default=())
    parser.add_argument("--start-together", type=int, default=0, help="wait until this many workers are ready")
    parser.add_argument("--ready-dir", default=None, help="where the workers line up (default: beside the SQLite file)")
    args = parser.parse_args(argv)
    if args.start_together:  # imports take seconds: line the workers up so that both get trials
        ready = Path(args.ready_dir) if args.ready_dir else Path(args.storage.split("///", 1)[1]).parent / "ready"
        ready.mkdir(exist_ok=True)
        (ready / str(os.getpid())).touch()
        deadline = time.time() + 60
        while len(list(ready.iterdir())) < args.start_together and time.time() < deadline:
            time.sleep(0.05)
    hpo.POLL_S = 0.2
    run_dir = Path(args.run_dir)
    cfg = search_cfg(run_dir, args.trials, storage=args.storage or None, study_name=args.name, resume=True)
    best = run_search(cfg, run_dir, make_stage(kill_on=set(args.kill_on), sleep=args.sleep))
    print(json.dumps(best))


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
    _worker_main(sys.argv[2:])
