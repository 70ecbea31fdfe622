"""The KL between the reverse-diffusion paths of two diffusion models."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tensordict import TensorDict, TensorDictBase, TensorDictParams
from tensordict.nn import dispatch
from tensordict.utils import NestedKey
from torchrl.objectives.common import LossModule

from torchrl_bdpo._validation import params_dtype, read_inputs
from torchrl_bdpo.diffusion.actor import DiffusionActor, DiffusionPath
from torchrl_bdpo.objectives.denoising import _check_actor, predict_eps_with
from torchrl_bdpo.objectives.utils import MovesSchedules, unwrap_exploration_wrappers


def check_same_schedule(policy: DiffusionActor, reference: DiffusionActor) -> None:
    """Raise a ``ValueError`` unless the two models share N, the betas, the sigma choice and dims."""
    if not policy.schedule.is_compatible(reference.schedule):
        raise ValueError(
            f"The policy and the reference use different noise schedules: policy "
            f"{policy.schedule.describe()}, reference {reference.schedule.describe()}. "
            f"The per-step path KL is only defined between reverse kernels of the same "
            f"steps and variances: build both with the same make_schedule(name, N, sigma=...)."
        )
    if policy.action_dim != reference.action_dim:
        raise ValueError(
            f"policy action_dim={policy.action_dim} but reference action_dim={reference.action_dim}: both models must act in the same action space."
        )
    p_obs = getattr(policy.network, "observation_dim", None)
    r_obs = getattr(reference.network, "observation_dim", None)
    if p_obs is not None and r_obs is not None and p_obs != r_obs:
        raise ValueError(f"policy observation_dim={p_obs} but reference observation_dim={r_obs}: both models must condition on the same observation.")


def path_step_inputs(observation: torch.Tensor, path: DiffusionPath):
    """``(a^n, n, s)`` for every step of ``path`` stacked on a leading ``N`` dim, for one batched pass.

    ``observation`` has the path's batch shape (``[*B(, M)], obs_dim``); returns tensors of
    shapes ``[N, *B, A]``, ``[N, *B]`` and ``[N, *B, obs_dim]``.
    """
    actions = path.actions[1:]  # a^1 .. a^N
    N = actions.shape[0]
    steps = torch.arange(1, N + 1, device=actions.device).view(N, *([1] * (actions.ndim - 2)))
    steps = steps.expand(actions.shape[:-1])
    obs = observation.expand(N, *actions.shape[1:-1], observation.shape[-1])
    return actions, steps, obs


def frozen_params(module: torch.nn.Module) -> TensorDictParams:
    """The parameters of ``module`` as buffers that share its storage (no gradient, not trained)."""
    params = TensorDict.from_module(module, as_module=True)
    return TensorDictParams(params.data, no_convert=True)


@unwrap_exploration_wrappers
class PathwiseKLLoss(MovesSchedules, LossModule):
    r"""KL between the reverse paths of a diffusion policy and a frozen reference.

    With Gaussian reverse kernels of equal variance ``sigma_n^2`` the path KL splits
    into per-step terms (BDPO, Gao et al. 2025, https://arxiv.org/abs/2502.04778):

    .. math::
        KL(p^{\pi}_{0:N} \| p^{\nu}_{0:N}) = E_{\pi}\Big[\sum_{n=1}^N l_n(s, a^n)\Big],
        \quad l_n = \frac{\|\mu^{\pi}_n - \mu^{\nu}_n\|^2}{2\sigma_n^2}
                  = w_n \|\epsilon_\pi - \epsilon_\nu\|^2 .

    :meth:`forward` samples ``a^N .. a^0`` from the policy at each observation and returns
    ``loss_kl``, the batch mean of ``sum_n l_n``, with the per-step means ``kl_per_step``
    (``kl_per_step[n - 1]`` is ``l_n``). Gradients reach the policy only: the reference's
    parameters are held as buffers that share the reference module's storage, so an
    externally updated reference (an EMA, say) is seen at once.

    The loss stands alone: any eps-prediction network and any observation (use a
    constant observation for an unconditional model). A KL-regularised reward
    fine-tuning loop (RLHF style) reads:

    >>> import torch, copy
    >>> from tensordict import TensorDict
    >>> from torchrl_bdpo.diffusion import DiffusionActor, EpsilonNetwork, make_schedule
    >>> from torchrl_bdpo.objectives import PathwiseKLLoss
    >>> pretrained = DiffusionActor(EpsilonNetwork(2, 1, hidden=32), make_schedule("vp", 5))
    >>> policy = copy.deepcopy(pretrained)          # the copy we fine-tune
    >>> kl_loss = PathwiseKLLoss(policy, pretrained, detach_path=False)
    >>> optim = torch.optim.Adam(kl_loss.parameters(), lr=1e-3)
    >>> reward = lambda a: -(a - 1.0).pow(2).sum(-1)  # any differentiable reward
    >>> eta = 0.1
    >>> obs = torch.zeros(64, 1)
    >>> for _ in range(3):
    ...     kl, per_step, path = kl_loss.path_kl(obs)    # one policy path per observation
    ...     loss = (-reward(path.action) + eta * kl).mean()
    ...     optim.zero_grad(); loss.backward(); optim.step()
    >>> out = kl_loss(TensorDict({"observation": obs}, [64]))
    >>> out["loss_kl"].shape, out["kl_per_step"].shape
    (torch.Size([]), torch.Size([5]))

    For a black-box reward, see BDPO's one-step actor loss (:meth:`step_kl` gives
    ``l_n`` at any ``(s, a^n, n)``).

    Args:
        actor_network (DiffusionActor): the policy ``pi`` being trained.
        reference_network (DiffusionActor): the reference ``nu``, with the same schedule.

    Keyword Args:
        num_samples (int, optional): paths per observation ``M``; the KL is averaged over
            them. Defaults to ``None`` (one path, no extra dim).
        detach_path (bool): if ``False`` (default) the gradient flows through the
            reparameterised chain as well as through ``l_n``, the exact gradient of the
            path KL. If ``True`` the visited ``a^n`` are treated as data and only the
            per-step terms are differentiated, as BDPO's one-step actor does.
        reduction (str): ``"none"`` | ``"mean"`` | ``"sum"`` over the batch. Defaults to ``"mean"``.
        validate (bool): raise a ``ValueError`` on NaN/inf observations. Defaults to ``True``.
    """

    @dataclass
    class _AcceptedKeys:
        """Configurable tensordict keys (change them with ``set_keys``).

        Attributes:
            observation (NestedKey): the observation the paths are drawn at.
                Defaults to ``"observation"``.
        """

        observation: NestedKey = "observation"

    default_keys = _AcceptedKeys
    tensor_keys: _AcceptedKeys
    out_keys = ["loss_kl", "kl_per_step"]

    actor_network: DiffusionActor
    actor_network_params: TensorDictParams
    target_actor_network_params: TensorDictParams
    reference_network: DiffusionActor
    reference_network_params: TensorDictParams

    def __init__(
        self,
        actor_network: DiffusionActor,
        reference_network: DiffusionActor,
        *,
        num_samples: int | None = None,
        detach_path: bool = False,
        reduction: str | None = None,
        validate: bool = True,
    ) -> None:
        _check_actor(actor_network, "actor_network")
        _check_actor(reference_network, "reference_network")
        check_same_schedule(actor_network, reference_network)
        if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 1):
            raise ValueError(f"num_samples={num_samples!r}: expected None or an integer >= 1.")
        super().__init__()
        self.reduction = "mean" if reduction is None else reduction
        self.num_samples = num_samples
        self.detach_path = detach_path
        self.validate = validate
        self.convert_to_functional(actor_network, "actor_network")
        self.reference_network_params = frozen_params(reference_network)
        self.__dict__["reference_network"] = reference_network

    def _forward_value_estimator_keys(self, **kwargs) -> None:
        pass

    @property
    def in_keys(self):
        return [self.tensor_keys.observation]

    def _eps(self, which: str, action_n, n, observation):
        return predict_eps_with(getattr(self, which), getattr(self, which + "_params"), action_n, n, observation)

    def step_kl(self, observation: torch.Tensor, action_n: torch.Tensor, n) -> torch.Tensor:
        """``l_n(s, a^n)`` for ``a^n`` of shape ``[*B, action_dim]`` and ``n`` an int or a long tensor ``B``.

        Gradients reach the policy (and ``action_n`` if it requires them), never the reference.
        """
        eps_pi = self._eps("actor_network", action_n, n, observation)
        eps_nu = self._eps("reference_network", action_n, n, observation)
        return self.actor_network.schedule.step_kl(eps_pi, eps_nu, n)

    def per_step_kl(self, observation: torch.Tensor, path: DiffusionPath, eps_policy: torch.Tensor | None = None) -> torch.Tensor:
        """``l_n`` along a given path, all steps in one batched pass: ``[N, *B]``, row ``n - 1`` is ``l_n``.

        ``eps_policy`` (``[N, *B, A]``) reuses the policy's eps from sampling; when omitted
        the policy is evaluated at the path's ``a^n``.
        """
        actions, steps, obs = path_step_inputs(observation, path)
        if eps_policy is None:
            eps_policy = self._eps("actor_network", actions, steps, obs)
        eps_nu = self._eps("reference_network", actions, steps, obs)
        return self.actor_network.schedule.step_kl(eps_policy, eps_nu, steps)

    def path_kl(
        self, observation: torch.Tensor, *, num_samples: int | None = None, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, DiffusionPath]:
        """Sample policy paths at ``observation`` and return ``(path_kl, per_step, path)``.

        ``path_kl`` is ``sum_n l_n`` per path (``[*B]``, or ``[*B, M]`` with ``num_samples``),
        ``per_step`` is ``[N, *B(, M)]`` and ``path`` the :class:`DiffusionPath` sampled.
        """
        actor = self.actor_network
        if num_samples is None:
            num_samples = self.num_samples
        if num_samples is None:
            num_samples = actor.sampler.num_samples
        obs = observation if num_samples is None else observation.unsqueeze(-2).expand(*observation.shape[:-1], num_samples, observation.shape[-1])
        if self.detach_path:
            with torch.no_grad(), self.actor_network_params.to_module(actor, preserve_module_state=False):
                path = actor.sample_path(observation, num_samples=num_samples, noise=noise)
            per_step = self.per_step_kl(obs, path)
        else:
            with self.actor_network_params.to_module(actor, preserve_module_state=False):
                path = actor.sample_path(observation, num_samples=num_samples, noise=noise)
            per_step = self.per_step_kl(obs, path, eps_policy=path.eps)
        return per_step.sum(0), per_step, path

    @dispatch
    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        dtype = params_dtype(self.actor_network_params)
        (observation,) = read_inputs(tensordict, (self.tensor_keys.observation,), dtype, owner=type(self).__name__, finite=self.validate)
        kl, per_step, _ = self.path_kl(observation)
        if kl.ndim > observation.ndim - 1:  # average the M paths of each observation
            kl, per_step = kl.mean(-1), per_step.mean(-1)
        loss = self._reduce_loss(kl, tensordict)
        batch_dims = tuple(range(1, per_step.ndim))
        kl_per_step = per_step.detach().mean(batch_dims) if batch_dims else per_step.detach()
        return TensorDict({"loss_kl": loss, "kl_per_step": kl_per_step})
