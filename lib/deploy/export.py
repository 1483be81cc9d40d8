"""Export a query network (the student) to ONNX and TorchScript with its preprocessing contract.

TorchScript is deprecated upstream from torch 2.9 (it still works; its FutureWarnings are silenced here);
ONNX is the format to ship.

The contract is everything a client needs to turn an image into the network's input: the input size,
the resize rule of :class:`lib.data.transforms.EvalTransform` (shorter side to ``round(size * 8 / 7)``,
bilinear with antialiasing, centre crop ``size`` x ``size``, RGB scaled to [0, 1]), the mean and std,
plus what the output means (embedding dimension, unit norm, inner-product similarity) and which
embedding space it lives in (its own fingerprint and the teacher's it was distilled against). It is
stored as ONNX ``metadata_props`` (string values; lists as JSON) and as the TorchScript archive's
``contract.json`` extra file, so an exported file needs no other file beside it.

    model = load_exported("student.onnx")        # or "student.pt"
    vectors = model(batch)                       # (N, 3, size, size) float32 -> (N, D) unit rows
"""
from __future__ import annotations

import inspect
import json
import os
import warnings
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
from torch import Tensor, nn

from lib.checkpoint import network_fingerprint
from lib.models.net import RetrievalNet
from lib.utils import atomic_write

CONTRACT_VERSION = 1
#: opset 17: supported by every onnxruntime release since 1.11 (2022), with all the ops our networks use
ONNX_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "images", "embeddings"
TORCHSCRIPT_CONTRACT = "contract.json"


class _Embedder(nn.Module):
    """The network's ``forward`` as a plain tensor -> tensor module (no ``return_raw`` branch)."""

    def __init__(self, net: RetrievalNet):
        super().__init__()
        self.net = net

    def forward(self, images: Tensor) -> Tensor:
        return self.net.embed(images)[0]


def preprocessing_contract(net: RetrievalNet, image_size: int, *, teacher_fingerprint: Optional[str] = None
                           ) -> Dict[str, Any]:
    """The plain-JSON description of the input and output of ``net`` at ``image_size``."""
    size = int(image_size)
    return {
        "contract_version": CONTRACT_VERSION,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "input_layout": "NCHW float32, RGB",
        "image_size": size,
        "resize": {"shorter_side": round(size * 8 / 7), "interpolation": "bilinear", "antialias": True,
                   "crop": "center", "crop_size": [size, size],
                   "rule": "resize the shorter side to round(image_size * 8 / 7), then centre-crop image_size x image_size"},
        "scale": "divide 8-bit values by 255",
        "mean": [float(v) for v in net.meta["mean"]],
        "std": [float(v) for v in net.meta["std"]],
        "embedding_dim": int(net.outputdim),
        "output": "L2-normalised rows; similarity = inner product",
        "architecture": str(net.meta.get("architecture")),
        "network_fingerprint": network_fingerprint(net),
        "teacher_fingerprint": teacher_fingerprint or net.meta.get("teacher_fingerprint"),
    }


def _example(net: RetrievalNet, image_size: int, batch: int = 2) -> Tensor:
    return torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))


def export_onnx(net: RetrievalNet, path: str | os.PathLike, image_size: int, *, opset: int = ONNX_OPSET,
                teacher_fingerprint: Optional[str] = None) -> Dict[str, Any]:
    """Write ``net`` at ``image_size`` as ONNX (dynamic batch, fixed H and W) with the contract in its
    ``metadata_props``; returns the contract. Needs the ``onnx`` package; uses torch's TorchScript-based
    exporter (``dynamo=False``), which needs no further package."""
    try:
        import onnx
    except ImportError as err:
        raise ImportError("ONNX export needs the onnx package: pip install onnx (see requirements.txt)") from err
    path = Path(path)
    contract = preprocessing_contract(net, image_size, teacher_fingerprint=teacher_fingerprint)
    module = _Embedder(net).cpu().eval()
    kwargs = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset,
                  dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, do_constant_folding=True)
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False  # the TorchScript exporter: no onnxscript needed, same graph on torch 2.4+

    def write(tmp: str) -> None:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks traced as constants: H, W are fixed
            warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript-based exporter, chosen on purpose
            torch.onnx.export(module, (_example(net, image_size),), tmp, **kwargs)
        model = onnx.load(tmp)
        for key, value in contract.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
        model.doc_string = "raml-kd query network; preprocessing contract in metadata_props"
        onnx.checker.check_model(model)
        onnx.save(model, tmp)

    atomic_write(path, write)
    return contract


def export_torchscript(net: RetrievalNet, path: str | os.PathLike, image_size: int, *,
                       teacher_fingerprint: Optional[str] = None) -> Dict[str, Any]:
    """Write ``net`` as a traced TorchScript archive with the contract as the ``contract.json`` extra file
    (``torch.jit.load(path, _extra_files={'contract.json': ''})``); returns the contract."""
    path = Path(path)
    contract = preprocessing_contract(net, image_size, teacher_fingerprint=teacher_fingerprint)
    module = _Embedder(net).cpu().eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated upstream (torch >= 2.9), still works
        traced = torch.jit.trace(module, (_example(net, image_size),), check_trace=False)
        atomic_write(path, lambda tmp: torch.jit.save(traced, tmp,
                                                       _extra_files={TORCHSCRIPT_CONTRACT: json.dumps(contract)}))
    return contract


def read_onnx_contract(path: str | os.PathLike) -> Dict[str, Any]:
    import onnx

    model = onnx.load(os.fspath(path), load_external_data=False)
    contract: Dict[str, Any] = {}
    for entry in model.metadata_props:
        try:
            contract[entry.key] = json.loads(entry.value)
        except json.JSONDecodeError:
            contract[entry.key] = entry.value
    return contract


class ExportedModel:
    """An exported query network: ``model(images)`` (N, 3, S, S) -> (N, D) float32 tensor, and ``contract``."""

    def __init__(self, path: str | os.PathLike, threads: Optional[int] = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"exported model {self.path} does not exist")
        if self.path.suffix == ".onnx":
            try:
                import onnxruntime as ort
            except ImportError as err:
                raise ImportError(f"running {self.path} needs onnxruntime: pip install onnxruntime") from err
            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = options.inter_op_num_threads = int(threads)
            self.session = ort.InferenceSession(os.fspath(self.path), options, providers=["CPUExecutionProvider"])
            self.contract = read_onnx_contract(self.path)
            self.kind = "onnx"
        else:
            extra = {TORCHSCRIPT_CONTRACT: ""}
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    self.module = torch.jit.load(os.fspath(self.path), map_location="cpu", _extra_files=extra)
            except Exception as err:
                raise ValueError(f"{self.path} is neither an .onnx file nor a TorchScript archive: {err}") from err
            self.contract = json.loads(extra[TORCHSCRIPT_CONTRACT]) if extra[TORCHSCRIPT_CONTRACT] else {}
            self.kind = "torchscript"
        missing = [k for k in ("image_size", "mean", "std", "embedding_dim") if k not in self.contract]
        if missing:
            raise ValueError(f"{self.path} carries no preprocessing contract (missing {missing}); export it with export.py")

    @property
    def image_size(self) -> int:
        return int(self.contract["image_size"])

    @property
    def outputdim(self) -> int:
        return int(self.contract["embedding_dim"])

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        if self.kind == "onnx":
            array = images.detach().cpu().float().contiguous().numpy()
            return torch.from_numpy(np.asarray(self.session.run([OUTPUT_NAME], {INPUT_NAME: array})[0]))
        return self.module(images.float()).float()


def load_exported(path: str | os.PathLike, threads: Optional[int] = None) -> ExportedModel:
    return ExportedModel(path, threads)


__all__ = ["ONNX_OPSET", "preprocessing_contract", "export_onnx", "export_torchscript", "read_onnx_contract",
           "ExportedModel", "load_exported"]
