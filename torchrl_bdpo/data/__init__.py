"""Offline data: the toy 2D bandits, the offline replay buffers (Minari, D4RL, local) and generated datasets."""

from torchrl_bdpo.data.offline import (
    D4RL_ANTMAZE,
    D4RL_LOCOMOTION,
    D4RL_REF_SCORES,
    DatasetInfo,
    check_env_compatibility,
    dataset_env_id,
    discounted_returns,
    episode_index,
    episode_returns,
    exact_return_mask,
    make_offline_buffer,
    transitions_from_episodes,
)
from torchrl_bdpo.data.generate import GenerateConfig, generate
from torchrl_bdpo.data.online import TRANSITION_KEYS, OfflineToOnlineBuffer, to_offline_layout
from torchrl_bdpo.data.toy import TOY_DATASETS, make_toy_buffer, make_toy_data, optimal_policy_weights, optimal_value, sample_optimal_policy, toy_energy

__all__ = [
    "D4RL_ANTMAZE",
    "D4RL_LOCOMOTION",
    "D4RL_REF_SCORES",
    "DatasetInfo",
    "GenerateConfig",
    "generate",
    "check_env_compatibility",
    "dataset_env_id",
    "discounted_returns",
    "episode_index",
    "episode_returns",
    "exact_return_mask",
    "make_offline_buffer",
    "OfflineToOnlineBuffer",
    "TRANSITION_KEYS",
    "to_offline_layout",
    "transitions_from_episodes",
    "TOY_DATASETS",
    "make_toy_buffer",
    "make_toy_data",
    "optimal_policy_weights",
    "optimal_value",
    "sample_optimal_policy",
    "toy_energy",
]
