"""Diffusion core: noise schedules, networks and the reverse-chain actor."""
from torchrl_bdpo.diffusion.actor import DiffusionActor, DiffusionPath, DiffusionSampler
from torchrl_bdpo.diffusion.networks import (
    DiffusionValueNetwork,
    EpsilonNetwork,
    QValueNetwork,
    SinusoidalTimestepEmbedding,
    orthogonal_init_,
    timestep_embedding,
)
from torchrl_bdpo.diffusion.schedule import NoiseSchedule, make_schedule

__all__ = [
    "DiffusionActor",
    "DiffusionPath",
    "DiffusionSampler",
    "DiffusionValueNetwork",
    "EpsilonNetwork",
    "NoiseSchedule",
    "QValueNetwork",
    "SinusoidalTimestepEmbedding",
    "make_schedule",
    "orthogonal_init_",
    "timestep_embedding",
]
