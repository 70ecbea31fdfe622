"""TorchRL loss modules of BDPO."""
from torchrl_bdpo.objectives.denoising import DenoisingLoss
from torchrl_bdpo.objectives.pathwise_kl import PathwiseKLLoss, check_same_schedule

__all__ = ["DenoisingLoss", "PathwiseKLLoss", "check_same_schedule"]
