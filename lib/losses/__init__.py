"""Objectives, registered by name in ``OBJECTIVES`` (see ``lib.losses.base``)."""
from lib.losses.base import OBJECTIVES, Objective, ObjectiveSpec, build_objective, parse_objective_spec
from lib.losses import distill  # noqa: F401  (registers the paper's objectives)

for _module in ("metric", "proxy", "spherical", "warping"):
    try:
        __import__(f"lib.losses.{_module}")
    except ModuleNotFoundError as _err:  # written in parallel; remove this guard once all exist
        if _err.name != f"lib.losses.{_module}":
            raise

__all__ = ["OBJECTIVES", "Objective", "ObjectiveSpec", "build_objective", "parse_objective_spec"]
