"""Behavior cloning of a diffusion model: the eps-prediction denoising loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tensordict import TensorDict, TensorDictBase, TensorDictParams
from tensordict.nn import dispatch
from tensordict.utils import NestedKey
from torchrl.objectives.common import LossModule

from torchrl_bdpo._validation import params_dtype, read_inputs
from torchrl_bdpo.diffusion.actor import DiffusionActor
from torchrl_bdpo.objectives.utils import MovesSchedules, unwrap_exploration_wrappers


def _check_actor(actor, name: str) -> None:
    if not isinstance(actor, DiffusionActor):
        raise ValueError(
            f"{name} is a {type(actor).__name__}: expected a DiffusionActor. Wrap your eps-prediction network: DiffusionActor(network, make_schedule('vp', N))."
        )


def predict_eps_with(actor: DiffusionActor, params, action_n, n, observation) -> torch.Tensor:
    """``actor``'s epsilon at ``(s, a^n, n)`` under the functional parameters ``params``."""
    with params.to_module(actor, preserve_module_state=False):
        return actor.predict_eps(action_n, n, observation)


def eps_error(eps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``||eps_hat - eps||^2 / action_dim`` per sample: the denoising error of a prediction."""
    return (eps - noise).pow(2).mean(-1)


def denoising_error(actor: DiffusionActor, params, observation: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """``||eps_theta(a^n, n, s) - eps||^2 / action_dim`` at a random ``n ~ U{1..N}`` per sample."""
    action_n, n, noise = actor.schedule.noise_action(action)
    eps = predict_eps_with(actor, params, action_n, n, observation)
    return eps_error(eps, noise)


@unwrap_exploration_wrappers
class DenoisingLoss(MovesSchedules, LossModule):
    r"""The denoising (behavior-cloning) loss of a DDPM diffusion policy.

    For a dataset pair ``(s, a)``: ``n ~ U{1..N}``, ``eps ~ N(0, I)``,
    ``a^n = sqrt(abar_n) a + sqrt(1 - abar_n) eps`` and
    ``loss_denoising = || eps_theta(a^n, n, s) - eps ||^2 / action_dim`` (Ho et al., 2020).
    In BDPO it pretrains the behavior model ``nu`` and keeps training it during phase B.

    Args:
        actor_network (DiffusionActor): the diffusion model to train.

    Keyword Args:
        delay_actor (bool): create target parameters
            (``target_actor_network_params``) for an EMA copy moved by
            :class:`~torchrl.objectives.SoftUpdate`; BDPO keeps such an EMA of the
            behavior model as its KL reference. Defaults to ``False``.
        reduction (str): ``"none"`` | ``"mean"`` | ``"sum"``. Defaults to ``"mean"``.
        validate (bool): raise a ``ValueError`` on NaN/inf observations or actions.
            Defaults to ``True``.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchrl_bdpo.diffusion import DiffusionActor, EpsilonNetwork, make_schedule
        >>> from torchrl_bdpo.objectives import DenoisingLoss
        >>> actor = DiffusionActor(EpsilonNetwork(2, 3, hidden=32), make_schedule("vp", 5))
        >>> loss = DenoisingLoss(actor)
        >>> data = TensorDict({"observation": torch.randn(8, 3), "action": torch.rand(8, 2)}, [8])
        >>> out = loss(data)
        >>> out["loss_denoising"].backward()
        >>> sorted(out.keys())
        ['loss_denoising']
    """

    @dataclass
    class _AcceptedKeys:
        """Configurable tensordict keys (change them with ``set_keys``).

        Attributes:
            observation (NestedKey): the observation. Defaults to ``"observation"``.
            action (NestedKey): the dataset action. Defaults to ``"action"``.
        """

        observation: NestedKey = "observation"
        action: NestedKey = "action"

    default_keys = _AcceptedKeys
    tensor_keys: _AcceptedKeys
    out_keys = ["loss_denoising"]

    actor_network: DiffusionActor
    actor_network_params: TensorDictParams
    target_actor_network_params: TensorDictParams

    def __init__(self, actor_network: DiffusionActor, *, delay_actor: bool = False, reduction: str | None = None, validate: bool = True) -> None:
        _check_actor(actor_network, "actor_network")
        super().__init__()
        self.reduction = "mean" if reduction is None else reduction
        self.validate = validate
        self.delay_actor = delay_actor
        self.convert_to_functional(actor_network, "actor_network", create_target_params=delay_actor)

    def _forward_value_estimator_keys(self, **kwargs) -> None:
        pass

    @property
    def in_keys(self):
        return [self.tensor_keys.observation, self.tensor_keys.action]

    def denoising_error(self, observation: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """Per-sample squared eps error (mean over action dims), shape ``action.shape[:-1]``."""
        return denoising_error(self.actor_network, self.actor_network_params, observation, action)

    @dispatch
    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        dtype = params_dtype(self.actor_network_params)
        keys = (self.tensor_keys.observation, self.tensor_keys.action)
        observation, action = read_inputs(tensordict, keys, dtype, owner=type(self).__name__, finite=self.validate)
        loss = self._reduce_loss(self.denoising_error(observation, action), tensordict)
        return TensorDict({"loss_denoising": loss})
