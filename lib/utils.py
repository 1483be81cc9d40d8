"""Small helpers shared by the command-line entry points."""
from __future__ import annotations

import ast
import glob
import json
import math
import operator
import os
import random
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from lib.registry import UnknownNameError

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos}


def _arith(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return float(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_arith(node.left), _arith(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_arith(node.operand))
    raise ValueError(f"not an arithmetic expression: {ast.dump(node)}")


def parse_scales(text: str | List[float]) -> List[float]:
    """``'[1, 1/2**(1/2), 1/2]'`` -> [1.0, 0.707.., 0.5] without ``eval`` (arithmetic only)."""
    if isinstance(text, (list, tuple)):
        return [float(v) for v in text]
    try:
        tree = ast.parse(str(text).strip(), mode="eval").body
        items = tree.elts if isinstance(tree, (ast.List, ast.Tuple)) else [tree]
        scales = [_arith(item) for item in items]
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError) as err:
        raise ValueError(f"--multiscale {text!r}: expected a list of numbers such as '[1, 1/2**(1/2), 1/2]' ({err})") from None
    if not scales:
        raise ValueError(f"--multiscale {text!r}: give at least one scale")
    bad = [s for s in scales if not (math.isfinite(s) and s > 0)]
    if bad:
        raise ValueError(f"--multiscale {text!r}: scales must be positive finite numbers, got {bad[0]}")
    return scales


def select_device(spec: str = "auto") -> torch.device:
    """'auto' -> CUDA when there is one, else CPU; 'cpu', 'cuda', 'cuda:1' as given."""
    if spec in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def environment() -> Dict[str, Any]:
    """What, besides the code and the seed, decides the last bits of a result: the library versions,
    torch's intra-op thread count and the CPU instruction set its kernels were picked for (README:
    "Reproducibility"). Recorded in results.json."""
    from importlib import metadata

    versions = {}
    for name in ("torch", "torchvision", "timm", "numpy", "pillow", "scikit-learn", "scipy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", lambda: None)()
    return {"versions": versions, "threads": torch.get_num_threads(), "cpu_capability": capability,
            "onednn": bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)}


def _remove_stale_temporaries(path: Path, suffix: str) -> None:
    """Delete the temporary files that earlier :func:`atomic_write` calls to ``path`` left when their
    process was killed mid-write (``.NAME.<pid>.XXXX<suffix>`` whose process is gone). A file of a
    live process (another writer of the same path) is left alone; one written on another machine
    sharing the folder may be taken for a live one and stays, which is harmless."""
    prefix = f".{path.name}."
    for leftover in path.parent.glob(f"{glob.escape(prefix)}*{glob.escape(suffix)}"):
        parts = leftover.name[len(prefix):len(leftover.name) - len(suffix)].split(".")
        if len(parts) != 2 or not parts[0].isdigit():  # not ".NAME.<pid>.<random><suffix>"
            continue
        pid = parts[0]
        if int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
                continue  # alive: its write is still under way
            except ProcessLookupError:
                pass
            except (PermissionError, OSError):
                continue  # alive (another user's process) or unknown: leave it
        try:
            leftover.unlink()
        except FileNotFoundError:
            pass


def atomic_write(path: str | os.PathLike, write, suffix: str = ".tmp") -> Path:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it over ``path``: a run killed
    mid-write leaves the previous file (or none), never a partial one. ``suffix`` is for writers that
    pick the format from the name (Pillow, matplotlib). The temporary file's name holds the writer's
    process id, so the next write to ``path`` removes what a killed writer left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path, suffix)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, +-inf) replaced by None, so that it serialises as strict
    JSON (``null``), not as the bare ``NaN`` literal that Python's json writes and other parsers reject;
    numpy scalars and 0-d tensors become Python numbers, tuples lists."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.generic, torch.Tensor)) and getattr(obj, "ndim", 1) == 0:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def dumps_json(obj: Any, **kwargs: Any) -> str:
    """Strict JSON text of ``obj`` (non-finite floats as ``null``, see :func:`json_safe`)."""
    kwargs.setdefault("indent", 2)
    return json.dumps(json_safe(obj), allow_nan=False, default=str, **kwargs)


def write_json(obj: Any, path: str | os.PathLike) -> None:
    """Write strict JSON (NaN/inf as ``null``) atomically (temporary file + rename)."""
    text = dumps_json(obj) + "\n"

    def write(tmp):
        with open(tmp, "w") as handle:
            handle.write(text)

    atomic_write(path, write)


def autocast_context(device: torch.device, amp: Optional[str]):
    """``amp`` is None/'none', 'bf16' or 'fp16'; autocast only where it applies."""
    if not amp or amp == "none":
        return nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.autocast(device_type=device.type, dtype=dtype)


def resolve_amp(amp: str, device: torch.device) -> Optional[str]:
    """Autocast dtype name for ``device``: none on CPU; 'auto' = bf16 where supported, else fp16."""
    if device.type != "cuda" or amp == "none":
        return None
    if amp == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return amp


# what a script's bad input raises: the toolkit's messages name the file, key, option or value at fault. A
# plain KeyError is a bug, not an input: of the KeyErrors, only a registry's unknown name is here
INPUT_ERRORS = (ValueError, UnknownNameError, FileNotFoundError, FileExistsError, IsADirectoryError,
                NotADirectoryError, PermissionError)


def run_script(main, prog: str) -> None:
    """Run a script's ``main()`` and exit: 0 on success; on bad input (``INPUT_ERRORS``) the message alone,
    ``<prog>: error: <message>`` on stderr and exit status 2, as argparse does for a bad flag. Any other
    exception, and every one when ``RAML_TRACEBACK=1`` is set, keeps its traceback (a bug, not an input)."""
    try:
        main()
    except INPUT_ERRORS as err:
        if os.environ.get("RAML_TRACEBACK", "") not in ("", "0"):
            raise
        print(f"{prog}: error: {err}\n(set RAML_TRACEBACK=1 to see where it was raised)", file=sys.stderr)
        sys.exit(2)
    sys.exit(0)


__all__ = ["resolve_amp", "autocast_context", "parse_scales", "select_device", "seed_everything", "json_safe",
           "dumps_json", "write_json", "environment", "run_script", "INPUT_ERRORS"]

