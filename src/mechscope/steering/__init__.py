"""Steering vectors: find a direction (ActAdd, mean difference, SAE latent), add it while generating, and
measure what it does against what it costs (see docs/steering.md)."""

from mechscope.steering.apply import PositionTracker, SteeredGeneration, generate, hook_fn, steer
from mechscope.steering.vectors import (
    SteeringError,
    SteeringVector,
    actadd,
    mean_difference,
    random_like,
    sae_direction,
)

__all__ = [
    "PositionTracker",
    "SteeredGeneration",
    "SteeringError",
    "SteeringVector",
    "actadd",
    "generate",
    "hook_fn",
    "mean_difference",
    "random_like",
    "sae_direction",
    "steer",
]
