"""TorchRL loss modules of BDPO."""
from torchrl_bdpo.objectives.bdpo import BDPOLoss
from torchrl_bdpo.objectives.denoising import DenoisingLoss, denoising_error
from torchrl_bdpo.objectives.eta import EtaLagrangian
from torchrl_bdpo.objectives.update import BDPOUpdate, make_capturable
from torchrl_bdpo.objectives.pathwise_kl import PathwiseKLLoss, check_same_schedule
from torchrl_bdpo.objectives.utils import TargetSoftUpdate, aggregate_ensemble
from torchrl_bdpo.objectives.value import DiffusionValueLoss

__all__ = [
    "BDPOLoss",
    "BDPOUpdate",
    "DenoisingLoss",
    "DiffusionValueLoss",
    "EtaLagrangian",
    "PathwiseKLLoss",
    "TargetSoftUpdate",
    "aggregate_ensemble",
    "check_same_schedule",
    "denoising_error",
    "make_capturable",
]
