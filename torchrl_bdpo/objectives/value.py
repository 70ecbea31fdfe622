"""The lower-level (diffusion-step) TD loss of BDPO for the diffusion value V_n."""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from tensordict import TensorDict, TensorDictBase, TensorDictParams
from tensordict.nn import TensorDictModule, dispatch
from tensordict.utils import NestedKey
from torch import nn
from torchrl.objectives.common import LossModule

from torchrl_bdpo._validation import params_dtype, read_inputs, static_graph
from torchrl_bdpo.diffusion.actor import DiffusionActor
from torchrl_bdpo.diffusion.networks import orthogonal_init_
from torchrl_bdpo.diffusion.schedule import STEP_SAMPLINGS, StratifiedSteps, stratified_steps
from torchrl_bdpo.objectives.denoising import _check_actor, predict_eps_with
from torchrl_bdpo.objectives.pathwise_kl import check_same_schedule
from torchrl_bdpo.ensemble import aggregate_ensemble, check_aggregation, make_ensemble_members
from torchrl_bdpo.objectives.utils import MovesSchedules, unwrap_exploration_wrappers
from torchrl_bdpo.speed import SpeedOptions
from torchrl_bdpo.speed.chunks import ensemble_call
from torchrl_bdpo.speed.rows import next_value_q_rows, q_capacity_for


_UNSET = object()  # a deprecated keyword not given (None is one of its values)


def _speed_options(speed, chunk_rows, chunk_compile) -> SpeedOptions:
    """``speed``, or one built from the deprecated ``ensemble_chunk_*`` keywords."""
    if not (speed is None or isinstance(speed, SpeedOptions)):
        raise TypeError(f"speed={speed!r}: expected a torchrl_bdpo.speed.SpeedOptions or None (the defaults).")
    if chunk_rows is _UNSET and chunk_compile is _UNSET:
        return SpeedOptions() if speed is None else speed
    if speed is not None:
        raise ValueError(
            "got both speed= and the deprecated ensemble_chunk_rows / ensemble_chunk_compile: pass "
            "speed=SpeedOptions(ensemble_chunk_rows=..., ensemble_chunk_compile=...) alone."
        )
    warnings.warn(
        "ensemble_chunk_rows= and ensemble_chunk_compile= are deprecated: pass "
        "speed=torchrl_bdpo.speed.SpeedOptions(ensemble_chunk_rows=..., ensemble_chunk_compile=...).",
        DeprecationWarning,
        stacklevel=3,
    )
    return SpeedOptions(
        ensemble_chunk_rows="auto" if chunk_rows is _UNSET else chunk_rows, ensemble_chunk_compile=None if chunk_compile is _UNSET else chunk_compile
    )


def _check_positive_int(name: str, value, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}: expected an integer >= 1. {hint}")
    return value


@unwrap_exploration_wrappers
class DiffusionValueLoss(MovesSchedules, LossModule):
    r"""Lower-level TD for the diffusion value ``V_n`` of BDPO (Gao et al. 2025).

    For dataset ``(s, a)``: ``n ~ U{1..N}``, ``a^n = sqrt(abar_n) a + sqrt(1 - abar_n) eps``;
    one reverse step of the *target* actor draws ``M`` samples of ``a^{n-1}``; the
    target is

    .. math::
        y_V = \mathrm{agg}_k\Big(\frac1M \sum_m V^{tgt}_k(s, a^{n-1}_m, n-1)\Big) - \eta\, l_n(s, a^n),

    with ``V_0 := Q`` (the target Q ensemble at ``n = 1``), ``agg`` the LCB
    ``mean_k - rho std_k`` (or ``min`` / ``mean``) and ``l_n`` the per-step KL to the
    behavior model's EMA. ``loss_value`` is the mean over members (and batch) of
    ``(V_k(s, a^n, n) - y_V)^2``. No discount: the diffusion steps are not time steps.

    It stands alone for any diffusion policy with a per-step value (e.g. fine-tuning a
    diffusion model on a black-box reward: pass the reward as a parameter-free
    ``qvalue_network``). :class:`BDPOLoss` adds the Q TD, the actor and the behavior.

    Args:
        actor_network (DiffusionActor): the policy ``pi``; its EMA target takes the step.
        behavior_network (DiffusionActor): the behavior ``nu``; its EMA target is the KL
            reference. Same schedule as the actor.
        value_network (TensorDictModule): ``V(s, a^n, n)`` with in_keys among
            (observation, action, diffusion_step) keys, e.g. :func:`make_value_operator`;
            build it with the actor's ``num_steps`` to look its time branch up (faster, see
            :class:`~torchrl_bdpo.diffusion.DiffusionValueNetwork`); another ``num_steps`` is refused.
        qvalue_network (TensorDictModule): ``Q(s, a)`` (in_keys observation, action), or a
            parameter-free module computing a known reward.

    Keyword Args:
        eta (float): the KL weight ``eta > 0``.
        rho (float): the LCB coefficient, ``>= 0``. Defaults to 0.
        aggregation (str): ``"lcb"`` | ``"min"`` | ``"mean"``. Defaults to ``"lcb"``.
        num_qvalue_nets (int): ensemble size ``K`` of both Q and V. Defaults to 10.
        num_samples (int): ``M``, the ``a^{n-1}`` samples per state. Defaults to 10.
        network_init (callable or None): re-initialises each ensemble copy; defaults to
            orthogonal (gain sqrt 2) with zero biases. ``None`` keeps TorchRL's
            resampling. Pass a list of ``K`` modules to keep your own members.
        reduction (str): ``"none"`` | ``"mean"`` | ``"sum"``. Defaults to ``"mean"``.
        deactivate_vmap (bool): loop over the ensemble instead of vmap. Defaults to ``False``.
        speed (SpeedOptions, optional): the CPU speed strategies (ensemble row chunks, the Q
            target on ~``B / N`` rows under ``torch.compile``): the same values up to float
            rounding. Defaults to ``SpeedOptions()``.
        ensemble_chunk_rows, ensemble_chunk_compile: deprecated, the fields of ``speed``.
        validate (bool): raise a ``ValueError`` on NaN/inf inputs. Defaults to ``True``.
        step_sampling (str): how the V and actor objectives draw ``n`` for a batch:
            ``"uniform"``, i.i.d. ``U{1..N}`` per sample (the paper's); ``"stratified"``,
            :func:`~torchrl_bdpo.diffusion.stratified_steps`: each sample's ``n`` still
            ``U{1..N}`` (the same expected loss), the batch's counts per step balanced, so that
            the rows valued by ``V_0 = Q`` (``n = 1``) and by ``V`` (``n >= 2``) are index sets of
            known sizes. Each row then goes to one ensemble in every mode (eager, compiled, CUDA
            graphs), where ``"uniform"`` under CUDA graphs evaluates both on every row
            (docs/performance.md), and no host read in eager GPU steps. Defaults to ``"uniform"``.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchrl_bdpo.diffusion import (DiffusionActor, EpsilonNetwork, make_schedule,
        ...     make_qvalue_operator, make_value_operator)
        >>> from torchrl_bdpo.objectives import DiffusionValueLoss
        >>> schedule = make_schedule("vp", 5)
        >>> actor = DiffusionActor(EpsilonNetwork(2, 3, hidden=32), schedule)
        >>> behavior = DiffusionActor(EpsilonNetwork(2, 3, hidden=32), make_schedule("vp", 5))
        >>> loss = DiffusionValueLoss(actor, behavior, make_value_operator(3, 2, hidden=32),
        ...     make_qvalue_operator(3, 2, hidden=32), eta=0.1, num_qvalue_nets=2, num_samples=4)
        >>> data = TensorDict({"observation": torch.randn(8, 3), "action": torch.rand(8, 2)}, [8])
        >>> out = loss(data)
        >>> out["loss_value"].backward()
        >>> sorted(out.keys())
        ['loss_value', 'value_pred', 'value_step_kl', 'value_target']
    """

    @dataclass
    class _AcceptedKeys:
        """Configurable tensordict keys (change them with ``set_keys``).

        Attributes:
            observation (NestedKey): the state ``s``. Defaults to ``"observation"``.
            action (NestedKey): the dataset action. Defaults to ``"action"``.
            diffusion_step (NestedKey): the input key of the step ``n`` for the value
                network. Defaults to ``"diffusion_step"``.
            reward (NestedKey): the reward, read under ``"next"``. Defaults to ``"reward"``.
            done (NestedKey): read under ``"next"``. Defaults to ``"done"``.
            terminated (NestedKey): read under ``"next"``; stops bootstrapping. Defaults to ``"terminated"``.
        """

        observation: NestedKey = "observation"
        action: NestedKey = "action"
        diffusion_step: NestedKey = "diffusion_step"
        reward: NestedKey = "reward"
        done: NestedKey = "done"
        terminated: NestedKey = "terminated"

    default_keys = _AcceptedKeys
    tensor_keys: _AcceptedKeys
    out_keys = ["loss_value", "value_pred", "value_target", "value_step_kl"]

    actor_network: DiffusionActor
    actor_network_params: TensorDictParams
    target_actor_network_params: TensorDictParams
    behavior_network: DiffusionActor
    behavior_network_params: TensorDictParams
    target_behavior_network_params: TensorDictParams
    value_network: TensorDictModule
    value_network_params: TensorDictParams
    target_value_network_params: TensorDictParams
    qvalue_network: TensorDictModule
    qvalue_network_params: TensorDictParams
    target_qvalue_network_params: TensorDictParams

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
        network_init: Callable[[nn.Module], object] | None = orthogonal_init_,
        reduction: str | None = None,
        deactivate_vmap: bool = False,
        speed: SpeedOptions | None = None,
        validate: bool = True,
        step_sampling: str = "uniform",
        ensemble_chunk_rows=_UNSET,
        ensemble_chunk_compile=_UNSET,
    ) -> None:
        speed = _speed_options(speed, ensemble_chunk_rows, ensemble_chunk_compile)
        _check_actor(actor_network, "actor_network")
        _check_actor(behavior_network, "behavior_network")
        check_same_schedule(actor_network, behavior_network)
        if not (isinstance(eta, (int, float)) and eta > 0):
            raise ValueError(f"eta={eta!r}: expected a positive KL weight (the paper uses 0.05-1.0; 0.06 for the toy tasks).")
        check_aggregation(aggregation, rho)
        if step_sampling not in STEP_SAMPLINGS:
            raise ValueError(
                f'step_sampling={step_sampling!r}: expected one of {STEP_SAMPLINGS} ("uniform": i.i.d. '
                f'steps, the paper\'s; "stratified": balanced counts per step, see stratified_steps).'
            )
        _check_positive_int("num_qvalue_nets", num_qvalue_nets, "It is the ensemble size K of Q and V.")
        _check_positive_int("num_samples", num_samples, "It is M, the samples per state.")
        super().__init__()
        self.speed = speed
        # eta in a buffer, so that compiled and CUDA-graphed steps read its current value:
        # set_eta (EtaLagrangian, annealing) changes it in place. Not saved: the config sets it.
        self.register_buffer("_eta", torch.tensor(float(eta)), persistent=False)
        self.rho = float(rho)
        self.aggregation = aggregation
        self.num_qvalue_nets = num_qvalue_nets
        self.num_samples = num_samples
        self.reduction = "mean" if reduction is None else reduction
        self.deactivate_vmap = deactivate_vmap
        self.validate = validate
        self.step_sampling = step_sampling
        self._check_critic(value_network, "value_network", actor_network)
        self._check_critic(qvalue_network, "qvalue_network", actor_network)

        self.convert_to_functional(actor_network, "actor_network", create_target_params=True)
        self.convert_to_functional(behavior_network, "behavior_network", create_target_params=True)
        self._convert_ensemble(value_network, "value_network", network_init)
        self._convert_ensemble(qvalue_network, "qvalue_network", network_init)

    @property
    def eta(self) -> torch.Tensor:
        """The KL weight, a 0-dim tensor (:meth:`set_eta` changes it)."""
        return self._eta

    def set_eta(self, value) -> None:
        """Set the KL weight in place (a compiled or captured step sees the new value)."""
        value = float(value)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"eta={value!r}: expected a finite, positive KL weight.")
        with torch.no_grad():
            self._eta.fill_(value)

    # ------------------------------------------------------------------ set-up
    def _check_critic(self, module, name, actor) -> None:
        inner = getattr(module, "module", module)
        for attr in ("observation_dim", "action_dim"):
            mine = getattr(inner, attr, None)
            theirs = actor.action_dim if attr == "action_dim" else getattr(actor.network, attr, None)
            if mine is not None and theirs is not None and mine != theirs:
                raise ValueError(f"{name} has {attr}={mine} but the actor has {attr}={theirs}: build the critics with the dimensions of the data.")
        num_steps = getattr(inner, "num_steps", None) if name == "value_network" else None
        if num_steps is not None and num_steps != actor.num_steps:
            raise ValueError(
                f"value_network was built for num_steps={num_steps} but the actor has "
                f"{actor.num_steps} diffusion steps: build it with num_steps={actor.num_steps}."
            )
        if not hasattr(module, "in_keys"):
            raise ValueError(
                f"{name} is a {type(module).__name__}: expected a TensorDictModule whose in_keys "
                f"name the inputs, e.g. make_qvalue_operator / make_value_operator."
            )

    def _convert_ensemble(self, module, name, init) -> None:
        members = make_ensemble_members(module, self.num_qvalue_nets, init)
        if isinstance(members, list):
            self.convert_to_functional(members, name, self.num_qvalue_nets, create_target_params=True)
            if len(members) == 1:
                # TorchRL stacks a one-module list with expand_identical=True, which leaves
                # views instead of trainable leaves; rebuild a [1, ...] stack of Parameters.
                params = TensorDict.from_modules(members[0], as_module=True)
                setattr(self, f"{name}_params", params)
                setattr(self, f"target_{name}_params", TensorDictParams(params.data.clone(), no_convert=True))
        else:  # parameter-free: nothing to expand or train
            self.convert_to_functional(members, name, create_target_params=True)

    def _forward_value_estimator_keys(self, **kwargs) -> None:
        pass

    @property
    def in_keys(self):
        return [self.tensor_keys.observation, self.tensor_keys.action]

    # --------------------------------------------------------------- pieces
    def _critic_inputs(self, module, observation, action, step=None):
        keys = self.tensor_keys
        values = {keys.observation: observation, keys.action: action}
        if step is not None:
            values[keys.diffusion_step] = step
        try:
            return [values[k] for k in module.in_keys]
        except KeyError as err:
            raise KeyError(
                f"{type(module).__name__} reads in_keys={module.in_keys}, but the loss provides "
                f"{list(values)}; rename with loss.set_keys(...) or build the network with those keys."
            ) from err

    def _ensemble(self, module, params, inputs) -> torch.Tensor:
        """``module`` under each member of ``params``: ``[K, *out]`` (in row chunks as :attr:`speed` says)."""
        return ensemble_call(module, params, inputs, self.num_qvalue_nets, self.speed, use_vmap=not self.deactivate_vmap)

    def _qvalue(self, params, observation, action) -> torch.Tensor:
        """Q ensemble at ``(s, a)``: ``[K, *B]``."""
        inputs = self._critic_inputs(self.qvalue_network, observation, action)
        return self._ensemble(self.qvalue_network, params, inputs).squeeze(-1)

    def _value(self, params, observation, action, step) -> torch.Tensor:
        """V ensemble at ``(s, a^n, n)``: ``[K, *B]``."""
        inputs = self._critic_inputs(self.value_network, observation, action, step)
        return self._ensemble(self.value_network, params, inputs).squeeze(-1)

    def _next_value(self, observation, action_prev, step_prev, split: StratifiedSteps | None = None) -> torch.Tensor:
        """Target ``V_{n-1}`` at ``(s, a^{n-1})``, with ``V_0 = Q``: ``[K, *B]``.

        With ``split`` (the draw of stratified steps), each ensemble runs on its index set of rows,
        in every mode (:meth:`_next_value_split`). Otherwise:

        Eager: rows with ``n - 1 = 0`` go to Q and the others to V (each row evaluated once).
        Static graphs (``torch.compile``, CUDA-graph capture) evaluate both on every row and select
        with ``torch.where``; compiled CPU steps may instead run Q on ~``B / N`` rows
        (``speed.q_target_rows``, :func:`torchrl_bdpo.speed.rows.next_value_q_rows`).
        """
        q_params, v_params = self.target_qvalue_network_params, self.target_value_network_params
        if split is not None:
            return self._next_value_split(observation, action_prev, step_prev, q_params, v_params, split)
        if static_graph():
            capacity = self._q_target_rows(step_prev)
            if capacity is not None:
                return next_value_q_rows(
                    functools.partial(self._qvalue, q_params), functools.partial(self._value, v_params), observation, action_prev, step_prev, capacity
                )
            q = self._qvalue(q_params, observation, action_prev)
            v = self._value(v_params, observation, action_prev, step_prev)
            return torch.where(step_prev == 0, q, v)
        flat_obs = observation.reshape(-1, observation.shape[-1])
        flat_act = action_prev.reshape(-1, action_prev.shape[-1])
        flat_step = step_prev.reshape(-1)
        last = flat_step == 0
        rows_q = last.nonzero().squeeze(-1)
        rows_v = (~last).nonzero().squeeze(-1)
        out = flat_act.new_zeros(self.num_qvalue_nets, flat_step.numel())
        out = out.index_copy(1, rows_q, self._qvalue(q_params, flat_obs[rows_q], flat_act[rows_q]))
        out = out.index_copy(1, rows_v, self._value(v_params, flat_obs[rows_v], flat_act[rows_v], flat_step[rows_v]))
        return out.reshape(self.num_qvalue_nets, *step_prev.shape)

    def _q_target_rows(self, step_prev: torch.Tensor) -> int | None:
        """The rows a static graph evaluates ``V_0 = Q`` on, ``None`` for all (:attr:`speed`)."""
        if not self.speed.q_target_rows:
            return None
        return q_capacity_for(step_prev, self.actor_network.num_steps)

    def _next_value_split(self, observation, action_prev, step_prev, q_params, v_params, split) -> torch.Tensor:
        """``_next_value`` with Q on ``split.first_rows`` and V on ``split.later_rows``.

        A row is one state's ``M`` samples, which share their step. The two index sets cover every
        row and overlap in one row at most, whose value ``torch.where`` picks by its step; their
        sizes are fixed by the batch's, so the shapes are static without a host read. Dimensions
        ``expand``-ed along the samples (the state, the step) stay expanded views.
        """
        M = step_prev.shape[-1]
        batch = step_prev.shape[:-1]
        rows = batch.numel()
        if split.first_rows.numel() + split.later_rows.numel() < rows:
            raise ValueError(
                f"split covers {split.first_rows.numel()} + {split.later_rows.numel()} rows but the batch "
                f"has {rows}: pass the StratifiedSteps drawn for this batch (stratified_steps(batch_shape, N))."
            )
        obs = observation.reshape(rows, M, observation.shape[-1])
        act = action_prev.reshape(rows, M, action_prev.shape[-1])
        step = step_prev.reshape(rows, M)

        def take(x, idx):  # rows of x, keeping a dimension expanded along the samples expanded
            if x.shape[1] > 1 and x.stride(1) == 0:
                return x.narrow(1, 0, 1).index_select(0, idx).expand(idx.shape[0], *x.shape[1:])
            return x.index_select(0, idx)

        # each ensemble's result is bound before it is used: a chunked CPU ensemble is a graph
        # break, after which dynamo cannot resume a Tensor method looked up before the call
        out = act.new_zeros(self.num_qvalue_nets, rows, M)
        idx = split.later_rows
        if idx.numel():
            v = self._value(v_params, take(obs, idx), take(act, idx), take(step, idx))
            out = out.index_copy(1, idx, v)
        idx = split.first_rows
        if idx.numel():
            q = self._qvalue(q_params, take(obs, idx), take(act, idx))  # [K, rows, M]
            out = out.index_copy(1, idx, torch.where(take(step, idx) == 0, q, out.index_select(1, idx)))
        return out.reshape(-1, *batch, M)

    def draw_steps(self, action: torch.Tensor):
        """Noise dataset actions at fresh steps: ``(a^n, n, eps, split)``.

        ``n`` is drawn as :attr:`step_sampling` says; ``split`` is the :class:`StratifiedSteps` of
        a stratified draw (pass it to :meth:`one_step_objective`), ``None`` for i.i.d. steps.
        """
        schedule = self.actor_network.schedule
        if self.step_sampling == "uniform":
            return (*schedule.noise_action(action), None)
        split = stratified_steps(action.shape[:-1], schedule.num_steps, action.device)
        return (*schedule.noise_action(action, split.steps), split)

    def one_step_objective(self, observation, action_n, n, actor_params: TensorDictBase | None = None, split: StratifiedSteps | None = None):
        """The one-step objective at ``(s, a^n, n)`` under the given actor parameters.

        Returns ``(J, next_value, l_n)``, each of the batch shape:
        ``next_value = agg_k(mean_M V^tgt_{n-1}(s, a^{n-1}))`` with ``a^{n-1}`` drawn by one
        reparameterised reverse step, ``l_n`` the KL of that step to the behavior EMA, and
        ``J = next_value - eta * l_n``. Gradients flow to ``actor_params`` (and through
        ``a^{n-1}`` into the critics' inputs, never their parameters). ``split``: the
        :class:`StratifiedSteps` that drew ``n`` (from :meth:`draw_steps`), which lets each row
        go to one target ensemble in every mode.
        """
        if split is not None and split.steps.shape != n.shape:
            raise ValueError(
                f"split.steps has shape {tuple(split.steps.shape)} but n has {tuple(n.shape)}: pass the "
                f"StratifiedSteps that drew n (draw_steps(action) returns both), or split=None."
            )
        if actor_params is None:
            actor_params = self.target_actor_network_params
        actor = self.actor_network
        schedule = actor.schedule
        M = self.num_samples
        eps_pi = predict_eps_with(actor, actor_params, action_n, n, observation)
        mean = schedule.reverse_mean(action_n, n, eps_pi, actor.clip_denoised)
        z = torch.randn(*action_n.shape[:-1], M, action_n.shape[-1], dtype=mean.dtype, device=mean.device)
        scale = schedule.noise_scales[n].unsqueeze(-1).unsqueeze(-1)
        action_prev = mean.unsqueeze(-2) + scale * z
        obs_m = observation.unsqueeze(-2).expand(*observation.shape[:-1], M, observation.shape[-1])
        step_prev = (n - 1).unsqueeze(-1).expand(*n.shape, M)
        next_value = self._next_value(obs_m, action_prev, step_prev, split).mean(-1)
        next_value = aggregate_ensemble(next_value, self.aggregation, self.rho)
        with torch.no_grad():
            eps_nu = predict_eps_with(self.behavior_network, self.target_behavior_network_params, action_n, n, observation)
        step_kl = schedule.step_kl(eps_pi, eps_nu, n)
        return next_value - self.eta * step_kl, next_value, step_kl

    def _validate(self, tensordict, keys) -> None:
        """Missing keys, other dtypes and empty batches raise; NaN / inf too with ``validate``."""
        dtype = params_dtype(self.actor_network_params)
        read_inputs(tensordict, keys, dtype, owner=type(self).__name__, finite=self.validate)

    # ---------------------------------------------------------------- losses
    def value_loss(self, tensordict: TensorDictBase) -> tuple[torch.Tensor, dict]:
        """The V_n TD loss; returns ``(loss_value, metadata)``."""
        keys = self.tensor_keys
        self._validate(tensordict, (keys.observation, keys.action))
        observation, action = tensordict.get(keys.observation), tensordict.get(keys.action)
        action_n, n, _, split = self.draw_steps(action)
        with torch.no_grad():
            target, _, step_kl = self.one_step_objective(observation, action_n, n, split=split)
        pred = self._value(self.value_network_params, observation, action_n, n)
        loss = (pred - target).pow(2).mean(0)
        metadata = {"value_pred": pred.detach().mean(), "value_target": target.detach().mean(), "value_step_kl": step_kl.detach().mean()}
        return self._reduce_loss(loss, tensordict), metadata

    @dispatch
    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        loss, metadata = self.value_loss(tensordict)
        return TensorDict({"loss_value": loss, **metadata})
