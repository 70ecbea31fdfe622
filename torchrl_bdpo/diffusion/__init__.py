"""Diffusion core: noise schedules, networks and the reverse-chain actor."""

from torchrl_bdpo.diffusion.actor import DiffusionActor, DiffusionPath, DiffusionSampler
from torchrl_bdpo.diffusion.networks import (
    ChainCache,
    DiffusionValueNetwork,
    EpsilonNetwork,
    QValueNetwork,
    SinusoidalTimestepEmbedding,
    orthogonal_init_,
    make_qvalue_operator,
    make_value_operator,
    timestep_embedding,
)
from torchrl_bdpo.diffusion.reference import GaussianReferenceEpsilon, UniformReferenceEpsilon, make_reference
from torchrl_bdpo.diffusion.schedule import NoiseSchedule, StratifiedSteps, make_schedule, stratified_steps
from torchrl_bdpo.diffusion.select import QSelectActor, mean_of_best, select_by_q

__all__ = [
    "ChainCache",
    "DiffusionActor",
    "DiffusionPath",
    "DiffusionSampler",
    "DiffusionValueNetwork",
    "EpsilonNetwork",
    "GaussianReferenceEpsilon",
    "NoiseSchedule",
    "QSelectActor",
    "QValueNetwork",
    "SinusoidalTimestepEmbedding",
    "UniformReferenceEpsilon",
    "StratifiedSteps",
    "make_qvalue_operator",
    "make_reference",
    "make_schedule",
    "make_value_operator",
    "mean_of_best",
    "orthogonal_init_",
    "select_by_q",
    "stratified_steps",
    "timestep_embedding",
]
