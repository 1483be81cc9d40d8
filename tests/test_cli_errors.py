"""The scripts' answer to bad input: one line that names what is wrong, exit status 2, no traceback;
a bug keeps its traceback."""
import subprocess
import sys
from pathlib import Path

import pytest

from lib.registry import Registry, UnknownNameError
from lib.utils import run_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script,args,names", [
    ("main.py", ["--lr", "-1"], "option lr (--lr) = -1.0: must be > 0.0"),
    ("test.py", ["--student-path", "{tmp}/broken.pth"], "broken.pth is unreadable"),
    # the test datasets are loaded first: a misspelt one is refused before any network, any training
    ("test.py", ["--student-path", "{tmp}/broken.pth", "--datasets", "cjk-glyphs-mini-test,no-such-set-test"],
     "--datasets 'no-such-set-test': unknown dataset 'no-such-set'"),
    ("main.py", ["--test-datasets", "cjk-glyphs-mini-gallery"],
     "--test-datasets 'cjk-glyphs-mini-gallery': dataset 'cjk-glyphs-mini' has no subset 'gallery'"),
])
def test_a_script_given_bad_input_says_what_in_one_line(tmp_path, script, args, names):
    (tmp_path / "broken.pth").write_bytes(b"PK\x03\x04 not a checkpoint")
    done = subprocess.run([sys.executable, script, *[a.format(tmp=tmp_path) for a in args]], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"{script}: error: ") and names in done.stderr.splitlines()[0]
    assert "Traceback" not in done.stderr


def test_run_script_keeps_the_traceback_of_a_bug_and_on_request(monkeypatch, capsys):
    def bad_input():
        Registry("pooling").get_class("nosuch")

    with pytest.raises(SystemExit) as stop:
        run_script(bad_input, "x.py")
    assert stop.value.code == 2
    assert capsys.readouterr().err.startswith("x.py: error: unknown pooling 'nosuch'; choose one of: ")

    def bug():
        return {}["missing"]  # a plain KeyError is a bug, not an input

    with pytest.raises(KeyError):
        run_script(bug, "x.py")
    monkeypatch.setenv("RAML_TRACEBACK", "1")
    with pytest.raises(UnknownNameError):
        run_script(bad_input, "x.py")
    with pytest.raises(SystemExit) as stop:
        run_script(lambda: None, "x.py")
    assert stop.value.code == 0
