"""Objectives: every loss the trainer can minimise, behind one registry and one call signature.

An objective is an ``nn.Module`` whose ``forward`` takes an :class:`~lib.embeddings.Embeddings`
and returns a scalar tensor. The trainer minimises ``sum(weight_i * objective_i(batch))``; the
mode's own loss (distillation or triplet) is one objective like any other.

Specs on the command line: ``name[:weight][:key=value,key=value]``, e.g.
``--objective multisimilarity:0.5:alpha=2,beta=50``. In YAML the same spec is a mapping
``{name: multisimilarity, weight: 0.5, alpha: 2, beta: 50}``.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Union

from torch import Tensor, nn

from lib.embeddings import Embeddings
from lib.losses.functional import check_labels
from lib.registry import Registry

OBJECTIVES = Registry("objective")


class Objective(nn.Module):
    """Base class. ``lr_multiplier`` scales the learning rate of the objective's own parameters
    (proxies, learnable margins, flows); ``asymmetric`` makes the teacher embeddings the reference
    (database) side where the objective supports it."""

    lr_multiplier: float = 1.0

    def __init__(self, asymmetric: bool = False):
        super().__init__()
        self.asymmetric = asymmetric

    def reference(self, batch: Embeddings) -> Tensor:
        """The database side: the (detached) teacher embeddings when asymmetric, else the student's."""
        if self.asymmetric:
            if batch.teacher is None:
                raise ValueError(
                    f"{type(self).__name__}(asymmetric=True) needs teacher embeddings; "
                    "the 'sym' mode has none, use a teacher mode (ts_aug, ts_reg) or asymmetric=False"
                )
            return batch.teacher.detach()
        return batch.student

    def forward(self, batch: Embeddings) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class ProxyObjective(Objective):
    """Base of the objectives that hold per-class parameters (proxies, centres): ``embedding_dim`` and
    ``num_classes`` checked, labels checked against ``num_classes`` (:meth:`class_labels`), the class
    parameters trained at ``lr * lr_multiplier``. ``asymmetric=True`` is refused unless the subclass
    sets ``supports_asymmetric`` (its proxies can then come from the teacher)."""

    supports_asymmetric = False

    def __init__(self, embedding_dim: int, num_classes: int, lr_multiplier: float = 1.0, asymmetric: bool = False):
        super().__init__(asymmetric)
        if asymmetric and not self.supports_asymmetric:
            raise ValueError(f"{type(self).__name__}: asymmetric=True is not meaningful for a proxy loss "
                             "(the proxies are the reference side); use asymmetric=False")
        if embedding_dim < 1 or num_classes < 1:
            raise ValueError(f"{type(self).__name__}: embedding_dim={embedding_dim} and num_classes={num_classes} "
                             "must be >= 1")
        self.embedding_dim, self.num_classes, self.lr_multiplier = embedding_dim, num_classes, float(lr_multiplier)

    def class_labels(self, labels: Tensor) -> Tensor:
        """``labels`` as class indices (long), refused outside ``0..num_classes-1``."""
        check_labels(labels, self.num_classes, type(self).__name__)
        return labels.long()


@dataclass
class ObjectiveSpec:
    name: str
    weight: float = 1.0
    params: Dict[str, Any] = field(default_factory=dict)


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word such as a miner name


def parse_objective_spec(spec: Union[str, Mapping[str, Any], ObjectiveSpec]) -> ObjectiveSpec:
    """``'ms:0.5:alpha=2,beta=50'`` or ``{'name': 'ms', 'weight': 0.5, 'alpha': 2}`` -> ObjectiveSpec."""
    if isinstance(spec, ObjectiveSpec):
        return spec
    if isinstance(spec, Mapping):
        params = dict(spec)
        if "name" not in params:
            raise ValueError(f"objective spec {dict(spec)!r} has no 'name'")
        name = params.pop("name")
        weight = float(params.pop("weight", 1.0))
        params.update(params.pop("params", {}) or {})
        return ObjectiveSpec(str(name), weight, params)
    parts = str(spec).split(":", 2)
    name = parts[0].strip()
    if not name:
        raise ValueError(f"objective spec {spec!r} has no name; expected name[:weight][:key=value,...]")
    weight = 1.0
    if len(parts) > 1 and parts[1].strip():
        try:
            weight = float(parts[1])
        except ValueError:
            raise ValueError(f"objective spec {spec!r}: weight {parts[1]!r} is not a number") from None
    params: Dict[str, Any] = {}
    if len(parts) > 2 and parts[2].strip():
        for item in parts[2].split(","):
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"objective spec {spec!r}: parameter {item!r} is not key=value")
            params[key.strip()] = _literal(value.strip())
    return ObjectiveSpec(name, weight, params)


def build_objective(spec, *, embedding_dim: int, num_classes: int) -> tuple[ObjectiveSpec, Objective]:
    """Build a registered objective. ``embedding_dim`` and ``num_classes`` are passed to the
    constructors that declare them (proxy-based losses); other parameters come from the spec."""
    import inspect

    spec = parse_objective_spec(spec)
    cls = OBJECTIVES.get_class(spec.name)
    signature = inspect.signature(cls.__init__)
    accepts = set(signature.parameters)
    has_var_kw = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    unknown = [k for k in spec.params if k not in accepts and not has_var_kw]
    if unknown:
        valid = sorted(k for k in accepts if k not in ("self", "embedding_dim", "num_classes"))
        raise ValueError(
            f"objective {spec.name!r} has no parameter(s) {unknown}; valid: {valid}"
        )
    kwargs = dict(spec.params)
    if "embedding_dim" in accepts:
        kwargs.setdefault("embedding_dim", embedding_dim)
    if "num_classes" in accepts:
        kwargs.setdefault("num_classes", num_classes)
    return spec, cls(**kwargs)


__all__ = ["OBJECTIVES", "Objective", "ProxyObjective", "ObjectiveSpec", "parse_objective_spec", "build_objective"]
