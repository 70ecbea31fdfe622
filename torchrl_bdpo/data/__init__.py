"""Offline data: the toy 2D bandits (and, later, the offline buffers)."""
from torchrl_bdpo.data.toy import (
    TOY_DATASETS,
    make_toy_buffer,
    make_toy_data,
    optimal_policy_weights,
    optimal_value,
    sample_optimal_policy,
)

__all__ = [
    "TOY_DATASETS",
    "make_toy_buffer",
    "make_toy_data",
    "optimal_policy_weights",
    "optimal_value",
    "sample_optimal_policy",
]
