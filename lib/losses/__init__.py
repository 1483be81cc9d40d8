"""Objectives, registered by name in ``OBJECTIVES`` (see ``lib.losses.base``)."""
from lib.losses.base import OBJECTIVES, Objective, ObjectiveSpec, build_objective, parse_objective_spec
# importing the modules registers their objectives
from lib.losses import distill, metric, peers, proxy, spherical, warping  # noqa: F401

__all__ = ["OBJECTIVES", "Objective", "ObjectiveSpec", "build_objective", "parse_objective_spec"]
