"""The benchmark scripts run end to end at toy sizes: they print figures, not pass/fail, so a broken
option would otherwise surface only when someone needs the figure (``bench_pipeline --workers 0`` once
passed ``prefetch_factor`` to an in-process DataLoader, which torch refuses)."""
import graphlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(name, *args, timeout=240):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"{name} {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done.stdout


def test_bench_pipeline_with_in_process_loading_and_a_worker():
    out = run_script("bench_pipeline.py", "--image-size", "32", "--teacher-image-size", "48", "--pos-num", "2",
                     "--batch-size", "2", "--images", "4", "--samples", "4", "--batches", "2", "--workers", "0,1",
                     "--skip-step", "--compare-samples", "0")
    for backend in ("pil", "tensor"):
        assert re.search(rf"{backend}: [0-9.]+ views/s per worker", out), out


def test_bench_eval_agrees_with_the_reference_at_a_toy_size():
    """The script itself raises when the reference's mAP or R@1 differs from ours by more than 1e-6."""
    out = run_script("bench_eval.py", "--sizes", "300", "--profiles", "sop", "--repeats", "1", "--threads", "1")
    row = next(line for line in out.splitlines() if line.split()[:2] == ["300", "sop"])
    assert re.search(r"\|\s+[0-9.]+\s+[0-9.]+\s+\|", row), row  # mAP and R@1 printed


def _bench_quality():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "benchmarks" / "bench_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_quality_selects_students_with_the_runs_they_start_from():
    """``--configs`` reruns a few of experiments/glyphs/: a student whose ``student_path`` is another
    config's run brings that config along, so nothing trains from a run the benchmark did not make."""
    from lib.config import read_yaml

    bench = _bench_quality()
    every = {c.stem: read_yaml(c) for c in sorted(bench.GLYPHS.glob("*.yaml")) if c != bench.TEACHER_CONFIG}
    assert set(bench.select_configs(every, "*")) == set(every)
    csd = "ts_aug-lite0-64-label-csd-8ep-sym-start-lr4.5e-4-trainval"
    assert every[csd]["student_path"] == "runs/glyphs/sym-lite0-64/model_best.pth"
    assert set(bench.select_configs(every, csd)) == {csd, "sym-lite0-64"}
    chosen = bench.select_configs(every, "ts_aug-lite0-64-label-csd-*, ts_aug-lite0-64-paper-init")
    assert "ts_aug-lite0-64-paper-init" in chosen and "sym-lite0-64" in chosen and csd in chosen
    assert not any(name.startswith("ts_aug-lite0-32") for name in chosen)
    # every run a config names under runs/glyphs/ is the teacher's or another config's: nothing dangles
    for name, config in every.items():
        for key in ("student_path", "teacher_path"):
            parent = Path(config.get(key) or "").parent
            if parent.parent == Path("runs/glyphs"):
                assert parent.name in every or parent.name == bench.TEACHER_CONFIG.stem, (name, key)
    # a run trains before every config that starts from it or learns from it, whatever the names' order
    order = bench.training_order(every)
    assert sorted(order) == sorted(every)
    restart = "ts_aug-lite0-64-label-csd-16+16ep-restart-lr4.5e-4-trainval"
    assert Path(every[restart]["student_path"]).parent.name == "ts_aug-lite0-64-label-csd-16ep-sym-start-lr4.5e-4-trainval"
    assert restart < Path(every[restart]["student_path"]).parent.name  # sorted by name, it would come first
    for name, config in every.items():
        for key in ("student_path", "teacher_path"):
            made = bench._made_by(every, config, key)
            assert not made or order.index(made) < order.index(name), (name, key, made)
    loop = {"a": {"student_path": "runs/glyphs/b/model_best.pth"}, "b": {"teacher_path": "runs/glyphs/a/model_best.pth"}}
    with pytest.raises(graphlib.CycleError):
        bench.training_order(loop)
    with pytest.raises(SystemExit, match="no-such-config"):
        bench.select_configs(every, f"{csd},no-such-config")
    with pytest.raises(SystemExit, match="add it to --only"):
        bench.main(["--only", "default", "--configs", csd])
