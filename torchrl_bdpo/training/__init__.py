"""Optimisation around the losses: BDPO's optimizer steps, automatic eta, and a torchrl Trainer stepper."""

from torchrl_bdpo.training.eta import EtaLagrangian
from torchrl_bdpo.training.update import BDPOUpdate, make_capturable

__all__ = ["BDPOOptimizationStepper", "BDPOUpdate", "EtaLagrangian", "make_capturable"]


def __getattr__(name):
    if name == "BDPOOptimizationStepper":  # imports torchrl.trainers (and its collectors) on first use only
        from torchrl_bdpo.training.trainer import BDPOOptimizationStepper

        return BDPOOptimizationStepper
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
