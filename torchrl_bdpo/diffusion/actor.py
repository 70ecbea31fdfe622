"""The DDPM reverse chain as a TorchRL actor."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from tensordict.nn import TensorDictModule
from tensordict.utils import NestedKey
from torch import nn
from torchrl.envs.utils import ExplorationType, exploration_type

from torchrl_bdpo._validation import check_finite
from torchrl_bdpo.diffusion.schedule import NoiseSchedule

_DETERMINISTIC_TYPES = (ExplorationType.DETERMINISTIC, ExplorationType.MODE, ExplorationType.MEAN, ExplorationType.MEDIAN)


class DiffusionPath(NamedTuple):
    """A reverse path ``a^N -> ... -> a^0``.

    Attributes:
        actions: ``[N + 1, *B, action_dim]`` with ``actions[n] = a^n``, so
            ``actions[0]`` is the final action and ``actions[N]`` the starting noise.
        eps: ``[N, *B, action_dim]`` with ``eps[n - 1]`` the epsilon predicted at step ``n``
            (from ``a^n``).
    """

    actions: torch.Tensor
    eps: torch.Tensor

    @property
    def action(self) -> torch.Tensor:
        """The final action ``a^0``."""
        return self.actions[0]


def _expand_samples(observation: torch.Tensor, num_samples: int | None) -> torch.Tensor:
    if num_samples is None:
        return observation
    return observation.unsqueeze(-2).expand(*observation.shape[:-1], num_samples, observation.shape[-1])


class DiffusionSampler(nn.Module):
    """The reverse chain of an eps-prediction network under a :class:`NoiseSchedule`.

    This is the plain module inside :class:`DiffusionActor`; use the actor.
    """

    def __init__(
        self,
        network: nn.Module,
        schedule: NoiseSchedule,
        action_dim: int,
        *,
        clip_denoised: bool = False,
        num_samples: int | None = None,
        validate: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(schedule, NoiseSchedule):
            raise ValueError(f"schedule={schedule!r}: expected a NoiseSchedule, e.g. make_schedule('vp', 5).")
        if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 1):
            raise ValueError(f"num_samples={num_samples!r}: expected None or an integer >= 1.")
        net_action_dim = getattr(network, "action_dim", action_dim)
        if net_action_dim != action_dim:
            raise ValueError(
                f"action_dim={action_dim} but the network predicts eps of dimension {net_action_dim}; build both with the action dimension of the data."
            )
        self.network = network
        self.schedule = schedule
        self.action_dim = action_dim
        self.clip_denoised = clip_denoised
        self.num_samples = num_samples
        self.validate = validate

    @property
    def num_steps(self) -> int:
        return self.schedule.num_steps

    def predict_eps(self, action_n: torch.Tensor, n, observation: torch.Tensor, *, cache=None) -> torch.Tensor:
        """The network's epsilon at ``(s, a^n, n)``.

        Networks with a ``chain_cache(observation, N)`` method (:class:`EpsilonNetwork`) get
        their step-independent parts computed once (or taken from ``cache``); others are
        called as ``network(a^n, n, s)``.
        """
        if cache is None:
            cache = self._chain_cache(observation)
        if cache is None:
            return self.network(action_n, n, observation)
        return self.network(action_n, n, cache=cache)

    def _chain_cache(self, observation: torch.Tensor):
        make = getattr(self.network, "chain_cache", None)
        return None if make is None else make(observation, self.num_steps)

    def reverse_step(self, observation: torch.Tensor, action_n: torch.Tensor, n, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One reverse step ``a^n -> a^{n-1}``; returns ``(a^{n-1}, eps_hat)``.

        ``n`` is an int or a long tensor of the batch shape of ``action_n``. ``noise`` is the
        standard normal ``z`` (drawn when omitted); it is scaled by ``[n > 1] sigma_n``.
        """
        eps = self.predict_eps(action_n, n, observation)
        if noise is None:
            noise = torch.randn_like(action_n)
        return self.schedule.reverse_step(action_n, n, eps, noise, self.clip_denoised), eps

    def sample_path(
        self, observation: torch.Tensor, *, num_samples: int | None = None, noise: torch.Tensor | None = None, deterministic: bool = False
    ) -> DiffusionPath:
        """Run the full reverse chain from ``a^N ~ N(0, I)`` and return every ``a^n`` and ``eps``.

        Args:
            observation: ``[*B, observation_dim]``.

        Keyword Args:
            num_samples: draw ``M`` actions per observation; the actions then have
                shape ``[*B, M, action_dim]``. Defaults to the sampler's own setting.
            noise: ``[N + 1, *B(, M), action_dim]`` standard normal draws to use instead of
                fresh ones: ``noise[N]`` is ``a^N`` and ``noise[n - 1]`` the ``z`` of step ``n``.
            deterministic: start from ``a^N = 0`` and add no noise (a deterministic
                action; it is not a sample of the policy).
        """
        if num_samples is None:
            num_samples = self.num_samples
        obs = _expand_samples(observation, num_samples)
        shape = (self.num_steps + 1, *obs.shape[:-1], self.action_dim)
        if noise is None:
            if deterministic:
                noise = obs.new_zeros(shape)
            else:
                noise = torch.randn(shape, dtype=obs.dtype, device=obs.device)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}: expected {shape} (N + 1, batch, [num_samples,] action_dim).")
        action = noise[self.num_steps]
        actions = [action]
        eps_all = []
        # what the N network calls share (time MLP, the observation's part of the first layer),
        # computed once on the observations before their expansion to num_samples
        cache = self._chain_cache(observation)
        if cache is not None and cache.observation is not None and num_samples is not None:
            cache = cache._replace(observation=cache.observation.unsqueeze(-2))
        # static unroll over n = N..1: no branch on tensor values
        for n in range(self.num_steps, 0, -1):
            eps = self.predict_eps(action, n, obs, cache=cache)
            action = self.schedule.reverse_step(action, n, eps, noise[n - 1], self.clip_denoised)
            actions.append(action)
            eps_all.append(eps)
        return DiffusionPath(torch.stack(actions[::-1], 0), torch.stack(eps_all[::-1], 0))

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        if self.validate:
            check_finite("observation", observation)
        deterministic = exploration_type() in _DETERMINISTIC_TYPES
        return self.sample_path(observation, deterministic=deterministic).action


def _sampler_attribute(name: str, doc: str) -> property:
    """A read-only property of :class:`DiffusionActor` that reads its sampler's ``name``."""
    return property(lambda self: getattr(self.module, name), doc=doc)


class DiffusionActor(TensorDictModule):
    """A DDPM diffusion policy as a TensorDictModule: ``observation -> action``.

    The action is ``a^0`` of the reverse chain ``a^N ~ N(0, I)``,
    ``a^{n-1} = mu_n(s, a^n) + [n > 1] sigma_n z`` (docs/design.md section 2).

    Exploration types (``torchrl.envs.utils.set_exploration_type``):

    - ``RANDOM``, or none set: a sample of the policy (fresh noise each call).
    - ``DETERMINISTIC`` (and ``MODE``, ``MEAN``, ``MEDIAN``): the noiseless chain from
      ``a^N = 0``. It is deterministic, but it is not a sample of the policy: code
      that needs samples (every loss here) calls :meth:`sample_path` or
      :meth:`reverse_step` explicitly. TorchRL losses run under ``DETERMINISTIC``.

    Args:
        network (nn.Module): an eps-prediction network ``network(a^n, n, s) -> eps``,
            e.g. :class:`EpsilonNetwork`.
        schedule (NoiseSchedule): the noise schedule.

    Keyword Args:
        action_dim (int): defaults to ``network.action_dim``.
        in_keys (list of NestedKey): the observation key. Defaults to ``["observation"]``.
        out_keys (list of NestedKey): the action key. Defaults to ``["action"]``.
        clip_denoised (bool): clip ``x0_hat`` to [-1, 1] at every step (locomotion: on;
            toy 2D: off). Defaults to ``False``.
        num_samples (int, optional): draw ``M`` actions per observation, written as
            ``[*B, M, action_dim]``. Defaults to ``None`` (one action, no extra dim).
        validate (bool): check observations for NaN/inf in ``forward``. Defaults to ``True``.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchrl_bdpo.diffusion import DiffusionActor, EpsilonNetwork, make_schedule
        >>> actor = DiffusionActor(EpsilonNetwork(2, 3, hidden=32), make_schedule("vp", 5))
        >>> td = actor(TensorDict({"observation": torch.randn(4, 3)}, [4]))
        >>> td["action"].shape
        torch.Size([4, 2])
        >>> path = actor.sample_path(torch.randn(4, 3), num_samples=8)
        >>> path.actions.shape, path.eps.shape
        (torch.Size([6, 4, 8, 2]), torch.Size([5, 4, 8, 2]))
    """

    def __init__(
        self,
        network: nn.Module,
        schedule: NoiseSchedule,
        *,
        action_dim: int | None = None,
        in_keys: Sequence[NestedKey] = ("observation",),
        out_keys: Sequence[NestedKey] = ("action",),
        clip_denoised: bool = False,
        num_samples: int | None = None,
        validate: bool = True,
    ) -> None:
        if action_dim is None:
            action_dim = getattr(network, "action_dim", None)
            if action_dim is None:
                raise ValueError("action_dim=None and the network has no `action_dim` attribute: pass action_dim explicitly.")
        sampler = DiffusionSampler(network, schedule, action_dim, clip_denoised=clip_denoised, num_samples=num_samples, validate=validate)
        super().__init__(sampler, in_keys=list(in_keys), out_keys=list(out_keys))

    # Delegates, so that users and losses can call the chain pieces on the actor itself.
    sampler = property(lambda self: self.module, doc="The :class:`DiffusionSampler` this actor runs.")
    network = _sampler_attribute("network", "The eps-network.")
    schedule = _sampler_attribute("schedule", "The :class:`NoiseSchedule`.")
    num_steps = _sampler_attribute("num_steps", "``N``, the number of diffusion steps.")
    action_dim = _sampler_attribute("action_dim", "The action dimension.")
    clip_denoised = _sampler_attribute("clip_denoised", "Whether each step's ``a^0`` estimate is clipped to [-1, 1].")

    def predict_eps(self, action_n, n, observation):
        """See :meth:`DiffusionSampler.predict_eps`."""
        return self.module.predict_eps(action_n, n, observation)

    def reverse_step(self, observation, action_n, n, noise=None):
        """See :meth:`DiffusionSampler.reverse_step`."""
        return self.module.reverse_step(observation, action_n, n, noise)

    def sample_path(self, observation, **kwargs) -> DiffusionPath:
        """See :meth:`DiffusionSampler.sample_path`."""
        return self.module.sample_path(observation, **kwargs)
