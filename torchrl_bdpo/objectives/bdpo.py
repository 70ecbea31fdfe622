"""BDPO: the Q TD with a KL-penalised target, the diffusion value, the one-step actor and the behavior."""

from __future__ import annotations


import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModule, dispatch
from torchrl.objectives.utils import ValueEstimators, dispatch_value_estimator

from torchrl_bdpo._validation import read_flag, static_graph
from torchrl_bdpo.diffusion.actor import DiffusionActor
from torchrl_bdpo.diffusion.select import QSelectActor
from torchrl_bdpo.objectives.denoising import denoising_error, predict_eps_with
from torchrl_bdpo.objectives.pathwise_kl import path_step_inputs
from torchrl_bdpo.ensemble import adaptive_lcb_weight, aggregate_ensemble, check_aggregation, check_pessimism_share
from torchrl_bdpo.objectives.utils import TargetSoftUpdate, unwrap_exploration_wrappers
from torchrl_bdpo.objectives.value import DiffusionValueLoss


@unwrap_exploration_wrappers
class BDPOLoss(DiffusionValueLoss):
    r"""Behavior-Regularized Diffusion Policy Optimization (Gao et al., ICML 2025).

    Paper: https://arxiv.org/abs/2502.04778. BDPO maximises
    ``E_pi[Q(s, a)] - eta KL(p^pi_{0:N} || p^nu_{0:N})`` with the path KL split into
    per-step terms ``l_n`` (see :class:`PathwiseKLLoss`), and learns at two time scales:

    1. :meth:`qvalue_loss` — upper-level TD for the Q ensemble:
       ``y_Q = r + gamma (1 - terminated) (agg_k mean_M Q^tgt_k(s', a'^0) - eta mean_M sum_n l_n(s', a'^n))``,
       the paths ``a'^{N..0}`` drawn from the *target* actor at ``s'`` (``M`` per state)
       and ``l_n`` measured against the behavior EMA. ``truncated`` never stops bootstrapping.
       Transitions whose next state is terminal need no path: they are skipped
       (outside torch.compile and CUDA-graph capture, whose shapes must stay static), with the same targets.
    2. :meth:`value_loss` — lower-level TD for ``V_n`` (:class:`DiffusionValueLoss`).
    3. :meth:`actor_loss` — the one-step actor: ``a^n`` from a dataset action at a fresh
       ``n``, one reparameterised step of the *online* actor gives ``M`` samples of
       ``a^{n-1}``, ``J = agg_k mean_M V^tgt_{n-1}(s, a^{n-1}) - eta l_n`` (``Q^tgt`` at
       ``n = 1``), ``loss_actor = -J``. No backpropagation through the chain.
    4. :meth:`behavior_loss` — the behavior model's continued denoising training
       (``train_behavior=True``); its EMA stays the KL reference.

    :meth:`forward` runs the four in that order and returns every ``loss_*`` with
    detached diagnostics. Scripts call the methods themselves to run the actor and the
    behavior every k-th step. Targets move with :class:`TargetSoftUpdate`
    (``loss.make_target_updaters()``): critics every step, actor and behavior after
    their own steps.

    Args:
        actor_network (DiffusionActor): the policy ``pi``.
        behavior_network (DiffusionActor): the behavior ``nu`` (pretrained with
            :class:`DenoisingLoss`); same schedule as the actor.
        value_network (TensorDictModule): ``V(s, a^n, n)``, e.g.
            ``make_value_operator(obs_dim, action_dim, num_steps=N)`` (:func:`make_value_operator`;
            ``num_steps`` looks its time branch up: faster, the same values).
        qvalue_network (TensorDictModule): ``Q(s, a)``, e.g. :func:`make_qvalue_operator`.

    Keyword Args:
        eta (float): KL weight ``eta > 0`` (hopper 0.2, walker 0.15, halfcheetah 0.05, toy 0.06).
        rho (float): LCB coefficient (hopper 2.0, walker 1.0, halfcheetah 0.5, antmaze 0.8, toy 0).
        qvalue_target_rho (float, optional): the LCB coefficient of the Q TD target alone
            (``agg_k`` in step 1); ``rho`` still weighs the V targets and the actor's objective.
            ``None`` (default) uses ``rho``, the paper's. In the Q target the offset ``rho std_k``
            is paid again at every bootstrap: with a steady spread it lowers Q's fixed point by
            ``gamma rho std / (1 - gamma)`` (docs/design.md, "Pessimism in the Q target"); ``0``
            keeps the lower bound where the actor chooses and out of Q's recursion.
        qvalue_target_pessimism (float, optional): ``kappa``: set the Q target's LCB weight
            per batch instead, ``rho_Q = kappa mean|r| / (gamma mean_s' std_k)``, so that the
            pessimism ``gamma rho_Q std_k(s')`` costs, on average over the batch's live next
            states, a share ``kappa`` of the reward per step; each state pays in proportion to
            its critics' spread. Q's fixed point is then about ``(1 - kappa)`` times the
            unpenalised one whatever the critics' spread, the reward scale and ``gamma`` (a
            fixed ``rho`` costs ``gamma rho std / r``, which those three set; docs/design.md,
            "Pessimism in the Q target"). For dense rewards of one sign (locomotion); keep a
            fixed weight for sparse ones, whose batches can hold no reward. Not with
            ``qvalue_target_rho``. Defaults to ``None`` (a fixed weight).
        aggregation (str): ``"lcb"`` | ``"min"`` | ``"mean"``. Defaults to ``"lcb"``.
        num_qvalue_nets (int): ensemble size ``K`` of Q and V. Defaults to 10.
        num_samples (int): ``M``. Defaults to 10.
        gamma (float): discount of the Q TD. Defaults to 0.99. Also settable with
            ``make_value_estimator(ValueEstimators.TD0, gamma=...)``.
        max_q_backup (bool): max over the ``M`` next actions instead of the mean (antmaze).
            Defaults to ``False``.
        train_behavior (bool): include the behavior's denoising loss. Defaults to ``True``.
        skip_terminal_next (bool): skip the path sampling for terminal next states in
            eager mode. Defaults to ``True``.
        **kwargs: ``network_init``, ``reduction``, ``deactivate_vmap``, ``speed``, ``validate``,
            ``step_sampling``: passed to :class:`DiffusionValueLoss`, which documents them
            (``step_sampling`` draws the steps of the V and actor objectives).

    The sigma choice (``sigma_n^2 = beta_n`` or the posterior variance) belongs to the
    schedule: ``make_schedule("vp", N, sigma="posterior")``.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchrl_bdpo.diffusion import (DiffusionActor, EpsilonNetwork, make_schedule,
        ...     make_qvalue_operator, make_value_operator)
        >>> from torchrl_bdpo.objectives import BDPOLoss
        >>> actor = DiffusionActor(EpsilonNetwork(2, 3, hidden=32), make_schedule("vp", 5))
        >>> behavior = DiffusionActor(EpsilonNetwork(2, 3, hidden=32), make_schedule("vp", 5))
        >>> loss = BDPOLoss(actor, behavior, make_value_operator(3, 2, hidden=32, num_steps=5),
        ...     make_qvalue_operator(3, 2, hidden=32), eta=0.2, rho=2.0, num_qvalue_nets=2,
        ...     num_samples=4)
        >>> critic_updater, actor_updater, behavior_updater = loss.make_target_updaters(tau=0.005)
        >>> data = TensorDict({
        ...     "observation": torch.randn(8, 3), "action": torch.rand(8, 2) * 2 - 1,
        ...     ("next", "observation"): torch.randn(8, 3), ("next", "reward"): torch.randn(8, 1),
        ...     ("next", "done"): torch.zeros(8, 1, dtype=torch.bool),
        ...     ("next", "terminated"): torch.zeros(8, 1, dtype=torch.bool)}, [8])
        >>> out = loss(data)
        >>> (out["loss_qvalue"] + out["loss_value"] + out["loss_actor"] + out["loss_behavior"]).backward()
        >>> sorted(k for k in out.keys() if k.startswith("loss_"))
        ['loss_actor', 'loss_behavior', 'loss_qvalue', 'loss_value']
    """

    out_keys = [
        "loss_qvalue",
        "loss_value",
        "loss_actor",
        "loss_behavior",
        "qvalue_pred",
        "qvalue_target",
        "qvalue_target_rho",
        "path_kl",
        "kl_per_step",
        "value_pred",
        "value_target",
        "value_step_kl",
        "actor_objective",
        "actor_next_value",
        "actor_step_kl",
    ]
    default_value_estimator = ValueEstimators.TD0
    SUPPORTED_VALUE_ESTIMATORS = (ValueEstimators.TD0,)

    def __init__(
        self,
        actor_network: DiffusionActor,
        behavior_network: DiffusionActor,
        value_network: TensorDictModule,
        qvalue_network: TensorDictModule,
        *,
        eta: float,
        rho: float = 0.0,
        aggregation: str = "lcb",
        num_qvalue_nets: int = 10,
        num_samples: int = 10,
        gamma: float = 0.99,
        max_q_backup: bool = False,
        train_behavior: bool = True,
        skip_terminal_next: bool = True,
        qvalue_target_rho: float | None = None,
        qvalue_target_pessimism: float | None = None,
        **kwargs,
    ) -> None:
        super().__init__(
            actor_network,
            behavior_network,
            value_network,
            qvalue_network,
            eta=eta,
            rho=rho,
            aggregation=aggregation,
            num_qvalue_nets=num_qvalue_nets,
            num_samples=num_samples,
            **kwargs,
        )
        if not 0 <= gamma <= 1:
            raise ValueError(f"gamma={gamma!r}: expected a discount in [0, 1].")
        self.gamma = gamma
        if qvalue_target_rho is not None:
            check_aggregation(aggregation, qvalue_target_rho, rho_name="qvalue_target_rho")
        self.qvalue_target_rho = self.rho if qvalue_target_rho is None else float(qvalue_target_rho)
        if qvalue_target_pessimism is not None:
            check_pessimism_share(qvalue_target_pessimism, aggregation, qvalue_target_rho)
            qvalue_target_pessimism = float(qvalue_target_pessimism)
        self.qvalue_target_pessimism = qvalue_target_pessimism
        self.max_q_backup = max_q_backup
        self.train_behavior = train_behavior
        self.skip_terminal_next = skip_terminal_next
        self.make_value_estimator(self.default_value_estimator, gamma=gamma)

    # ---------------------------------------------------------------- plumbing
    def make_value_estimator(self, value_type: ValueEstimators = None, **hyperparams):
        """TD(0) only: BDPO's Q target bootstraps one transition. ``gamma`` goes in ``hyperparams``."""
        if value_type is None:
            value_type = self.default_value_estimator
        if "gamma" in hyperparams:
            self.gamma = hyperparams["gamma"]
        dispatch_value_estimator(
            self,
            value_type,
            supported=self.SUPPORTED_VALUE_ESTIMATORS,
            tensor_keys={"reward": self.tensor_keys.reward, "done": self.tensor_keys.done, "terminated": self.tensor_keys.terminated},
            value_network=None,
            **hyperparams,
        )
        return self

    def _forward_value_estimator_keys(self, **kwargs) -> None:
        if self._value_estimator is not None:
            self._value_estimator.set_keys(reward=self.tensor_keys.reward, done=self.tensor_keys.done, terminated=self.tensor_keys.terminated)

    @property
    def in_keys(self):
        k = self.tensor_keys
        return [k.observation, k.action, ("next", k.observation), ("next", k.reward), ("next", k.done), ("next", k.terminated)]

    def make_target_updaters(self, tau: float = 0.005):
        """``(critics, actor, behavior)`` :class:`TargetSoftUpdate` objects with EMA rate ``tau``."""
        return (
            TargetSoftUpdate(self, ("qvalue_network", "value_network"), tau),
            TargetSoftUpdate(self, ("actor_network",), tau),
            TargetSoftUpdate(self, ("behavior_network",), tau),
        )

    @torch.no_grad()
    def init_actor_from_behavior(self) -> None:
        """The hand-over between pretraining and BDPO: the actor and its target become copies
        of the behavior EMA (``target_behavior_network_params``).

        Raises a ``ValueError`` when the behavior's parameters do not match the actor's (an
        analytic reference from :func:`~torchrl_bdpo.diffusion.make_reference` has none: fit
        the actor to it with :func:`~torchrl_bdpo.training.fit_actor_to_reference` instead).
        """
        src = self.target_behavior_network_params
        mine = self.actor_network_params
        if set(src.keys(True, True)) != set(mine.keys(True, True)) or any(src.get(k).shape != mine.get(k).shape for k in mine.keys(True, True)):
            raise ValueError(
                "init_actor_from_behavior: the behavior network's parameters do not match the actor's "
                f"({len(list(src.keys(True, True)))} vs {len(list(mine.keys(True, True)))} entries, or other "
                "shapes). Build both with the same EpsilonNetwork settings; for an analytic reference, fit "
                "the actor to it with torchrl_bdpo.training.fit_actor_to_reference(loss, observations) instead."
            )
        mine.data.copy_(src.data)
        self.target_actor_network_params.data.copy_(src.data)

    def make_acting_module(self, num_candidates: int = 10, *, actor_params=None, **kwargs):
        """A :class:`~torchrl_bdpo.diffusion.QSelectActor` over the target actor and target Q.

        It shares their storage, so it always acts with the current targets. ``actor_params``
        replaces the target actor's (e.g. ``loss.actor_network_params``: the online actor, as a
        probe). ``kwargs`` (``compile``, ``cudagraphs``, ``validate``, ...) go to :class:`QSelectActor`.
        """
        return QSelectActor(
            self.actor_network,
            self.qvalue_network,
            actor_params=self.target_actor_network_params if actor_params is None else actor_params,
            qvalue_params=self.target_qvalue_network_params,
            num_qvalue_nets=self.num_qvalue_nets,
            num_candidates=num_candidates,
            observation_key=self.tensor_keys.observation,
            action_key=self.tensor_keys.action,
            **kwargs,
        )

    # ------------------------------------------------------------ Q target
    def next_state_value(
        self,
        next_observation: torch.Tensor,
        terminated: torch.Tensor,
        noise: torch.Tensor | None = None,
        all_terminal: bool = False,
        reward: torch.Tensor | None = None,
    ):
        """``agg_k(mean_M Q^tgt_k(s', a'^0)) - eta * mean_M sum_n l_n(s', a'^n)`` per transition.

        Returns ``(value, path_kl, kl_per_step)`` with ``value`` and ``path_kl`` of the batch
        shape (0 where the next state is terminal) and ``kl_per_step`` ``[N]`` averaged over the
        non-terminal rows. ``noise`` (``[N + 1, *B, M, A]``) fixes the paths' draws; it is
        drawn for the whole batch either way, so skipping terminal rows changes nothing else.

        ``all_terminal=True`` (a Python constant, so a compiled graph specialises on it) says
        that every next state is terminal: no path is sampled, as eager does when it finds no
        live row. Static graphs cannot look at the data, so :class:`BDPOUpdate` passes it for
        compiled CPU steps (bandits, such as the toy 2D tasks, have no live row at all).

        ``reward`` (the batch's rewards) sets the LCB weight with ``qvalue_target_pessimism``,
        which needs it; :meth:`qvalue_target` passes it.
        """
        return self._next_state_value(next_observation, terminated, noise, all_terminal, reward)[:3]

    def _next_state_value(self, next_observation, terminated, noise=None, all_terminal=False, reward=None):
        """:meth:`next_state_value` and, fourth, the Q target's LCB weight (a 0-dim tensor; NaN
        for an adaptive weight when no next state is live)."""
        if self.qvalue_target_pessimism is not None and reward is None:
            raise ValueError(
                f"qvalue_target_pessimism={self.qvalue_target_pessimism}: the Q target's LCB weight is set "
                f"from the batch's rewards; pass reward=... (qvalue_target does)."
            )
        actor = self.actor_network
        N, M, A = actor.num_steps, self.num_samples, actor.action_dim
        batch = next_observation.shape[:-1]
        if noise is None:
            noise = torch.randn(N + 1, *batch, M, A, dtype=next_observation.dtype, device=next_observation.device)
        if all_terminal and not static_graph() and not bool(terminated.all()):
            raise ValueError(
                f"all_terminal=True, but {int((~terminated).sum())} of {terminated.numel()} next "
                f"states are not terminated; pass all_terminal=False (the default) for such batches."
            )
        obs, noise_rows = next_observation, noise
        rows = None
        if not all_terminal and self.skip_terminal_next and not static_graph():
            flat_term = terminated.reshape(-1)
            rows = (~flat_term).nonzero().squeeze(-1)
            obs = next_observation.reshape(-1, next_observation.shape[-1])[rows]
            noise_rows = noise.reshape(N + 1, -1, M, A)[:, rows]
            all_terminal = rows.numel() == 0
        if all_terminal:  # every next state is terminal: nothing to bootstrap
            # 0 * the noise: a graph would drop an unused draw, and the RNG stream would then
            # differ from eager's, which draws it (finite noise: exact zeros)
            zeros = noise.sum(0).sum((-2, -1)).mul(0).reshape(batch)
            nan = next_observation.new_full((N,), float("nan"))
            rho_q = nan[0] if self.qvalue_target_pessimism is not None else next_observation.new_tensor(self.qvalue_target_rho)
            return zeros, zeros.clone(), nan, rho_q
        with self.target_actor_network_params.to_module(actor, preserve_module_state=False):
            path = actor.sample_path(obs, num_samples=M, noise=noise_rows)
        obs_m = obs.unsqueeze(-2).expand(*obs.shape[:-1], M, obs.shape[-1])
        # l_n for all n in one batched pass of the behavior EMA
        actions, steps, obs_n = path_step_inputs(obs_m, path)
        eps_nu = predict_eps_with(self.behavior_network, self.target_behavior_network_params, actions, steps, obs_n)
        per_step = actor.schedule.step_kl(path.eps, eps_nu, steps)  # [N, rows, M]
        path_kl = per_step.sum(0).mean(-1)
        q = self._qvalue(self.target_qvalue_network_params, obs_m, path.action)  # [K, rows, M]
        q = q.max(-1).values if self.max_q_backup else q.mean(-1)
        live = None if rows is not None else (~terminated.reshape(batch)).to(q.dtype)
        if self.qvalue_target_pessimism is not None:
            spread = q.std(0, correction=0)
            rho_q = adaptive_lcb_weight(spread, reward, self.gamma, self.qvalue_target_pessimism, live)
            value = q.mean(0) - rho_q * spread - self.eta * path_kl
            if live is not None:  # a static graph's batch with no live row: no weight to report
                rho_q = torch.where(live.sum() > 0, rho_q, rho_q.new_tensor(float("nan")))
        else:
            rho_q = q.new_tensor(self.qvalue_target_rho)
            value = aggregate_ensemble(q, self.aggregation, self.qvalue_target_rho) - self.eta * path_kl
        if rows is not None:
            kl_per_step = per_step.mean((1, 2))
            numel = terminated.numel()
            value = value.new_zeros(numel).index_copy(0, rows, value).reshape(batch)
            path_kl = path_kl.new_zeros(numel).index_copy(0, rows, path_kl).reshape(batch)
        else:
            value, path_kl = value * live, path_kl * live
            # mean over the non-terminal rows only (NaN if there are none), as with the skip
            kl_per_step = (per_step * live.unsqueeze(-1)).sum(tuple(range(1, per_step.ndim))) / (live.sum() * M)
        return value, path_kl, kl_per_step, rho_q

    # --------------------------------------------------------------- losses
    def qvalue_target(self, tensordict: TensorDictBase, noise: torch.Tensor | None = None, all_terminal: bool = False):
        """``y_Q = r + gamma (1 - terminated) * next_state_value`` per transition (no gradient).

        Returns ``(target, path_kl, kl_per_step)``; see :meth:`next_state_value` (and its
        ``all_terminal``).
        """
        return self._qvalue_target(tensordict, noise, all_terminal)[:3]

    def _qvalue_target(self, tensordict: TensorDictBase, noise: torch.Tensor | None = None, all_terminal: bool = False):
        """:meth:`qvalue_target` and, fourth, the Q target's LCB weight (see :meth:`_next_state_value`)."""
        k = self.tensor_keys
        reward = tensordict.get(("next", k.reward))
        terminated = read_flag(tensordict, ("next", k.terminated), owner=type(self).__name__)
        if terminated is None:
            raise KeyError(
                f"The batch has no {('next', k.terminated)!r} entry: BDPO bootstraps on "
                f"'terminated' (never 'truncated'). Store it in the replay buffer, or rename "
                f"it with loss.set_keys(terminated=...)."
            )
        with torch.no_grad():
            next_value, path_kl, kl_per_step, rho_q = self._next_state_value(tensordict.get(("next", k.observation)), terminated, noise, all_terminal, reward)
            done = read_flag(tensordict, ("next", k.done), owner=type(self).__name__)
            td = TensorDict(
                {("next", k.reward): reward, ("next", k.terminated): terminated, ("next", k.done): terminated if done is None else done},
                batch_size=tensordict.batch_size,
            )
            # n-step batches (torchrl's MultiStep): gamma ** steps_to_next_obs, as TD0Estimator
            steps_key = self.value_estimator.tensor_keys.steps_to_next_obs
            steps = tensordict.get(steps_key, None)
            if steps is not None:
                td.set(steps_key, steps)
            target = self.value_estimator.value_estimate(td, next_value=next_value.reshape(reward.shape))
        return target.reshape(next_value.shape), path_kl, kl_per_step, rho_q

    def qvalue_loss(self, tensordict: TensorDictBase, all_terminal: bool = False) -> tuple[torch.Tensor, dict]:
        """The Q-ensemble TD loss with the KL-penalised target; returns ``(loss_qvalue, metadata)``.

        ``all_terminal``: see :meth:`next_state_value`.
        """
        k = self.tensor_keys
        self._validate(tensordict, (k.observation, k.action, ("next", k.observation), ("next", k.reward)))
        target, path_kl, kl_per_step, rho_q = self._qvalue_target(tensordict, all_terminal=all_terminal)
        pred = self._qvalue(self.qvalue_network_params, tensordict.get(k.observation), tensordict.get(k.action))
        loss = (pred - target).pow(2).mean(0)
        terminated = read_flag(tensordict, ("next", k.terminated), owner=type(self).__name__)
        live = (~terminated).reshape(target.shape).to(path_kl.dtype)
        metadata = {
            "qvalue_pred": pred.detach().mean(),
            "qvalue_target": target.detach().mean(),
            # the Q target's LCB weight: qvalue_target_rho, or this batch's adaptive one
            "qvalue_target_rho": rho_q,
            # mean over non-terminal next states; NaN (0/0) when there is none: no path was sampled
            "path_kl": (path_kl * live).sum() / live.sum(),
            "kl_per_step": kl_per_step.detach(),
        }
        return self._reduce_loss(loss, tensordict), metadata

    def actor_loss(self, tensordict: TensorDictBase) -> tuple[torch.Tensor, dict]:
        """The one-step actor loss ``-J``; returns ``(loss_actor, metadata)``."""
        k = self.tensor_keys
        self._validate(tensordict, (k.observation, k.action))
        observation, action = tensordict.get(k.observation), tensordict.get(k.action)
        action_n, n, _, split = self.draw_steps(action)
        objective, next_value, step_kl = self.one_step_objective(observation, action_n, n, self.actor_network_params, split=split)
        metadata = {"actor_objective": objective.detach().mean(), "actor_next_value": next_value.detach().mean(), "actor_step_kl": step_kl.detach().mean()}
        return self._reduce_loss(-objective, tensordict), metadata

    def behavior_loss(self, tensordict: TensorDictBase) -> tuple[torch.Tensor, dict]:
        """The behavior model's denoising loss; returns ``(loss_behavior, metadata)``."""
        k = self.tensor_keys
        self._validate(tensordict, (k.observation, k.action))
        err = denoising_error(self.behavior_network, self.behavior_network_params, tensordict.get(k.observation), tensordict.get(k.action))
        return self._reduce_loss(err, tensordict), {}

    @dispatch
    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        loss_q, meta_q = self.qvalue_loss(tensordict)
        loss_v, meta_v = self.value_loss(tensordict)
        loss_a, meta_a = self.actor_loss(tensordict)
        out = {"loss_qvalue": loss_q, "loss_value": loss_v, "loss_actor": loss_a, **meta_q, **meta_v, **meta_a}
        if self.train_behavior:
            out["loss_behavior"], _ = self.behavior_loss(tensordict)
        return TensorDict(out)
