"""Deprecated: :class:`BDPOOptimizationStepper` lives in :mod:`torchrl_bdpo.training`."""

import warnings

from torchrl_bdpo.training.trainer import BDPOOptimizationStepper

warnings.warn("torchrl_bdpo.trainers is deprecated: import BDPOOptimizationStepper from torchrl_bdpo.training.", DeprecationWarning, stacklevel=2)

__all__ = ["BDPOOptimizationStepper"]
