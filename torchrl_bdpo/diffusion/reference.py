"""Analytic reference models: the uniform and the standard-Gaussian action distributions.

BDPO regularises toward a reference ``nu`` (docs/design.md section 5):
the data's behavior (offline RL), a pretrained model (post-training), or the uniform
policy on the action box, which turns ``E_pi[Q] - eta KL(pi || nu)`` into maximum-entropy
RL with temperature ``eta``. For the uniform and Gaussian distributions the reference's
epsilon needs no network: it is the posterior mean ``E[eps | a^n]`` under the forward
process ``a^n = sqrt(abar_n) a^0 + sqrt(1 - abar_n) eps``, which is exactly what a
perfectly trained eps-network of that distribution predicts.

Both are plain modules with the eps-network signature ``network(a^n, n, s) -> eps`` and no
parameters; :func:`make_reference` wraps one in a :class:`DiffusionActor` that goes wherever
a behavior model goes (``PathwiseKLLoss``, ``BDPOLoss`` with ``train_behavior=False``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from torchrl_bdpo.diffusion.schedule import NoiseSchedule

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _log_phi(x: torch.Tensor) -> torch.Tensor:
    return -0.5 * x * x - _LOG_SQRT_2PI


def _mills_excess(x: torch.Tensor) -> torch.Tensor:
    """``phi(x) / Q(x) - x`` (Q the upper normal tail), without cancellation for large ``x``."""
    direct = torch.exp(_log_phi(x) - torch.special.log_ndtr(-x)) - x
    big = x.clamp_min(20.0)  # the asymptotic series, exact to float64 there
    inv2 = 1 / (big * big)
    series = (1 - inv2 * (2 - inv2 * (10 - inv2 * (74 - inv2 * 706)))) / big
    return torch.where(x > 20, series, direct)


def uniform_posterior_mean(action_n: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """``E[a^0 | a^n]`` for ``a^0 ~ U[-1, 1]^d``, per dimension.

    Given ``a^n``, ``a^0`` is ``N(mu, s^2)`` truncated to [-1, 1] with ``mu = a^n / sqrt(abar)``
    and ``s^2 = (1 - abar) / abar``; its mean is ``mu + s (phi(alpha) - phi(beta)) / (Q(alpha) -
    Q(beta))`` with ``alpha, beta = (-1 - mu) / s, (1 - mu) / s`` and ``Q`` the upper normal
    tail. Computed in float64, on the side ``mu <= 0`` (the other by symmetry), in log space
    (``log_ndtr``) and written as ``-1 + (-1 - mu) (c - 1) + s (R(alpha) - alpha) c`` with ``R``
    the Mills ratio and ``c`` the two-bound correction, so it stays finite and accurate far in
    the tails (``|a^n| = 10``, ``abar`` from 1e-4 to 1 - 1e-7).
    """
    dtype = action_n.dtype
    x = action_n.double()
    abar = abar.double().expand_as(x)
    sign = torch.where(x > 0, -1.0, 1.0).to(x)
    mu = sign * x / abar.sqrt()  # <= 0
    s = ((1 - abar) / abar).clamp_min(1e-300).sqrt()
    alpha, beta = (-1 - mu) / s, (1 - mu) / s  # beta > 0, beta > alpha
    log_phi_ratio = _log_phi(beta) - _log_phi(alpha)  # log phi(beta) / phi(alpha)
    log_q_ratio = torch.special.log_ndtr(-beta) - torch.special.log_ndtr(-alpha)  # log Q(beta) / Q(alpha) < 0
    # c = (1 - phi(beta)/phi(alpha)) / (1 - Q(beta)/Q(alpha)); c - 1 without cancellation
    denom = -torch.expm1(log_q_ratio)
    c_minus_1 = (torch.exp(log_q_ratio) - torch.exp(log_phi_ratio)) / denom
    mean = -1 + (-1 - mu) * c_minus_1 + s * _mills_excess(alpha) * (1 + c_minus_1)
    return (sign * mean.clamp(-1, 1)).to(dtype)


def uniform_posterior_eps(action_n: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """``E[eps | a^n] = (a^n - sqrt(abar) E[a^0 | a^n]) / sqrt(1 - abar)`` for ``a^0 ~ U[-1, 1]^d``."""
    abar = abar.to(action_n.dtype)
    mean = uniform_posterior_mean(action_n, abar)
    return (action_n - abar.sqrt() * mean) / (1 - abar).clamp_min(1e-12).sqrt()


def gaussian_posterior_eps(action_n: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """``E[eps | a^n] = sqrt(1 - abar) a^n`` for ``a^0 ~ N(0, I)`` (then ``a^n ~ N(0, I)`` too)."""
    return (1 - abar.to(action_n.dtype)).sqrt() * action_n


class _AnalyticEpsilon(nn.Module):
    def __init__(self, schedule: NoiseSchedule, action_dim: int, observation_dim: int | None = None) -> None:
        super().__init__()
        if not isinstance(schedule, NoiseSchedule):
            raise ValueError(f"schedule={schedule!r}: expected a NoiseSchedule, e.g. make_schedule('vp', 5).")
        # not a submodule: the DiffusionActor around this owns (and moves) the schedule, and
        # the reference then has no parameters or buffers of its own
        object.__setattr__(self, "schedule", schedule)
        self.action_dim = action_dim
        if observation_dim is not None:
            self.observation_dim = observation_dim

    def _abar(self, action_n: torch.Tensor, n) -> torch.Tensor:
        return self.schedule._gather(self.schedule.alphas_cumprod, n, action_n)

    def forward(self, action_n: torch.Tensor, n, observation: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        if action_n.shape[-1] != self.action_dim:
            raise ValueError(f"action_n has shape {tuple(action_n.shape)}: expected a last dimension of {self.action_dim}.")
        return self._eps(action_n, self._abar(action_n, n))


class UniformReferenceEpsilon(_AnalyticEpsilon):
    """The exact eps of the uniform distribution on [-1, 1]^d (maximum-entropy reference).

    Actions outside [-1, 1] (e.g. Pendulum's ±2) must reach the env through
    ``torchrl.envs.transforms.ActionScaling``: the reference is uniform on the policy's box.
    """

    _eps = staticmethod(uniform_posterior_eps)


class GaussianReferenceEpsilon(_AnalyticEpsilon):
    """The exact eps of ``N(0, I)`` actions: ``sqrt(1 - abar_n) a^n``."""

    _eps = staticmethod(gaussian_posterior_eps)


REFERENCES = {"uniform": UniformReferenceEpsilon, "gaussian": GaussianReferenceEpsilon}


def make_reference(kind: str, schedule: NoiseSchedule, action_dim: int, observation_dim: int | None = None, **actor_kwargs):
    """A :class:`DiffusionActor` whose eps is the analytic ``kind`` (``"uniform"`` | ``"gaussian"``).

    It has no parameters: pass it as the behavior (reference) model with ``train_behavior=False``.
    ``actor_kwargs`` go to :class:`DiffusionActor` (``clip_denoised`` defaults to True for
    ``"uniform"``: its samples then stay in the box).

    Examples:
        >>> import torch
        >>> from torchrl_bdpo.diffusion import make_reference, make_schedule
        >>> ref = make_reference("uniform", make_schedule("vp", 5), action_dim=2, observation_dim=3)
        >>> a = ref.sample_path(torch.zeros(1000, 3)).action
        >>> bool(a.abs().max() <= 1), abs(float(a.mean())) < 0.1
        (True, True)
    """
    from torchrl_bdpo.diffusion.actor import DiffusionActor

    if kind not in REFERENCES:
        raise ValueError(f"kind={kind!r}: expected one of {sorted(REFERENCES)}.")
    actor_kwargs.setdefault("clip_denoised", kind == "uniform")
    return DiffusionActor(REFERENCES[kind](schedule, action_dim, observation_dim), schedule, **actor_kwargs)
