"""TorchRL loss modules of BDPO."""

import warnings

from torchrl_bdpo.objectives.bdpo import BDPOLoss
from torchrl_bdpo.objectives.denoising import DenoisingLoss, denoising_error
from torchrl_bdpo.objectives.pathwise_kl import PathwiseKLLoss, check_same_schedule
from torchrl_bdpo.ensemble import aggregate_ensemble
from torchrl_bdpo.objectives.utils import TargetSoftUpdate
from torchrl_bdpo.objectives.value import DiffusionValueLoss

__all__ = [
    "BDPOLoss",
    "DenoisingLoss",
    "DiffusionValueLoss",
    "PathwiseKLLoss",
    "TargetSoftUpdate",
    "aggregate_ensemble",
    "check_same_schedule",
    "denoising_error",
]

_MOVED = {"BDPOUpdate", "make_capturable", "EtaLagrangian"}


def __getattr__(name):
    # deprecated aliases: the optimizer steps moved to torchrl_bdpo.training
    if name in _MOVED:
        warnings.warn(f"torchrl_bdpo.objectives.{name} is deprecated: import it from torchrl_bdpo.training.", DeprecationWarning, stacklevel=2)
        import torchrl_bdpo.training as training

        return getattr(training, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
