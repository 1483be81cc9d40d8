"""Networks from checkpoints: a self-describing checkpoint, a file in ``pretrained/`` or a published
name (``load_network``), or an architecture built with ImageNet weights (``get_network``)."""
from __future__ import annotations

from typing import Any, Dict, Optional

from lib.checkpoint import load_checkpoint
from lib.models.net import RetrievalNet, build_network, network_from_meta
from lib.models.zoo import resolve_model_path


def _meta_from_reference(meta: Dict[str, Any]) -> Dict[str, Any]:
    """Published checkpoints of the reference code: a torchvision architecture name, no version."""
    meta = dict(meta)
    if "version" not in meta and ":" not in str(meta.get("architecture", "")):
        meta["architecture"] = f"tv:{meta['architecture']}"
    return meta


def network_from_state(state: Dict[str, Any], source: str = "checkpoint") -> RetrievalNet:
    if "meta" not in state or "state_dict" not in state:
        raise ValueError(f"{source} is not a network checkpoint: keys {sorted(state)}; expected 'meta' and 'state_dict'")
    net = network_from_meta(_meta_from_reference(state["meta"]))
    try:
        net.load_state_dict(state["state_dict"])
    except RuntimeError as err:
        raise ValueError(f"{source} does not match its own metadata {state['meta'].get('architecture')!r}: {err}") from err
    return net


def load_network(name_or_path: str, pretrained_dir: Optional[str] = None) -> RetrievalNet:
    """Rebuild a network from a self-describing checkpoint, a file in ``pretrained/`` or a published name."""
    path = resolve_model_path(name_or_path, pretrained_dir)
    net = network_from_state(load_checkpoint(path), str(path))
    net.meta["checkpoint"] = str(path)
    return net


def get_network(architecture: Optional[str] = None, path: Optional[str] = None, *, pooling: str = "gem",
                whitening: int = 0, pretrained: bool = True, weights: Optional[str] = None,
                image_size: Optional[int] = None, pretrained_dir: Optional[str] = None) -> RetrievalNet:
    """``--student/--teacher`` (an architecture, built with ImageNet weights) or ``--*-path`` (a checkpoint)."""
    if path:
        return load_network(path, pretrained_dir)
    if not architecture:
        raise ValueError("give an architecture name or a checkpoint path")
    return build_network(architecture, pooling, whitening, pretrained=pretrained, weights=weights, image_size=image_size)


__all__ = ["get_network", "load_network", "network_from_state"]
