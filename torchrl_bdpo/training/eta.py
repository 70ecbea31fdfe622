"""Automatic eta: a Lagrange multiplier on the mean path KL, as SAC tunes its temperature.

BDPO maximises ``E_pi[Q] - eta KL(pi || nu)`` (docs/design.md section 5). Instead of a fixed
``eta``, the constrained problem ``max E_pi[Q]  s.t.  KL(pi || nu) <= d * kappa`` (``d`` the
action dimension, ``kappa`` a target KL per action dimension) has the Lagrangian dual
``min_{eta >= 0} eta (d kappa - KL)``: eta rises while the measured KL is above the target and
falls while it is below. With the uniform reference the path KL is a negative entropy plus a
constant, so this is SAC's target-entropy rule in BDPO's terms.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["EtaLagrangian"]


class EtaLagrangian(nn.Module):
    """Tunes ``loss.eta`` toward a target mean path KL; its own Adam on ``log eta``.

    Args:
        loss: a :class:`~torchrl_bdpo.objectives.BDPOLoss` (or :class:`DiffusionValueLoss`): its
            ``eta`` is the starting value and is set after each :meth:`step`.

    Keyword Args:
        target_kl_per_dim (float): ``kappa``, the target path KL per action dimension (nats).
        lr (float): Adam's learning rate on ``log eta``. Defaults to 3e-4 (SAC's).
        min_eta (float): a floor, so that the KL term never vanishes. Defaults to 1e-4.

    Call :meth:`step` with the mean path KL of the critic step's Q-target paths (its
    ``path_kl`` entry); a NaN (a batch with no live next state) is skipped.

    Examples:
        >>> # tuner = EtaLagrangian(loss, target_kl_per_dim=0.5)
        >>> # critic = update.critic(batch); tuner.step(critic["path_kl"])
    """

    def __init__(self, loss, *, target_kl_per_dim: float, lr: float = 3e-4, min_eta: float = 1e-4) -> None:
        super().__init__()
        if not (isinstance(target_kl_per_dim, (int, float)) and target_kl_per_dim > 0):
            raise ValueError(f"target_kl_per_dim={target_kl_per_dim!r}: expected a positive KL per action dimension (nats), e.g. 0.5.")
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"lr={lr!r}: expected a positive learning rate.")
        self.loss_module = [loss]  # not a submodule: its parameters are not this module's
        action_dim = loss.actor_network.action_dim
        self.target_kl = float(target_kl_per_dim) * action_dim
        self.min_eta = float(min_eta)
        self.log_eta = nn.Parameter(torch.tensor(math.log(max(float(loss.eta), self.min_eta))))
        self.optimizer = torch.optim.Adam([self.log_eta], lr=lr)

    @property
    def eta(self) -> float:
        return max(math.exp(self.log_eta.item()), self.min_eta)

    def step(self, path_kl) -> dict:
        """One dual step from a measured mean path KL; returns ``{"eta", "loss_eta"}`` (empty if skipped)."""
        kl = float(path_kl)
        if not math.isfinite(kl):
            return {}
        loss_eta = self.log_eta * (self.target_kl - kl)  # d/d log_eta < 0 while kl > target: eta rises
        self.optimizer.zero_grad(set_to_none=True)
        loss_eta.backward()
        self.optimizer.step()
        self.loss_module[0].set_eta(self.eta)
        return {"eta": self.eta, "loss_eta": float(loss_eta.detach())}

    def state_dict(self, *args, **kwargs):
        return {"log_eta": self.log_eta.detach().clone(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state_dict, strict: bool = True):
        with torch.no_grad():
            self.log_eta.copy_(state_dict["log_eta"])
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.loss_module[0].set_eta(self.eta)
