"""The benchmark scripts run end to end at toy sizes: they print figures, not pass/fail, so a broken
option would otherwise surface only when someone needs the figure (``bench_pipeline --workers 0`` once
passed ``prefetch_factor`` to an in-process DataLoader, which torch refuses)."""
import re
import subprocess
import sys
from pathlib import Path

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
