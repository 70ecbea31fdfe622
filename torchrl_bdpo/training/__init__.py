"""Optimisation around the losses: BDPO's optimizer steps, automatic eta, the actor's fit to an analytic
reference, and a torchrl Trainer stepper."""

from torchrl_bdpo.training.eta import EtaLagrangian
from torchrl_bdpo.training.init import fit_actor_to_reference, reference_path_kl
from torchrl_bdpo.training.update import BDPOUpdate, make_capturable

__all__ = ["BDPOOptimizationStepper", "BDPOUpdate", "EtaLagrangian", "fit_actor_to_reference", "make_capturable", "reference_path_kl"]


def __getattr__(name):
    if name == "BDPOOptimizationStepper":  # imports torchrl.trainers (and its collectors) on first use only
        from torchrl_bdpo.training.trainer import BDPOOptimizationStepper

        return BDPOOptimizationStepper
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
