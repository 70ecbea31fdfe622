"""Plain ``nn.Module`` networks of the reference implementation (docs/design.md section 3).

They take tensors, not TensorDicts; :class:`~torchrl_bdpo.diffusion.DiffusionActor`
and TorchRL's ``ValueOperator`` are their TensorDict faces.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from torchrl_bdpo._validation import check_last_dim, check_num_steps
from torchrl_bdpo.speed.kernels import (  # noqa: F401  (networks.Mish, networks.set_fuse_narrow_linear, ...)
    NARROW_FEATURES,
    Linear,
    Mish,
    check_fuse_narrow,
    fuse_narrow_linear,
    mish_one_exp,
    narrow_linear,
    set_fuse_narrow_linear,
)


def orthogonal_init_(module: nn.Module, gain: float = math.sqrt(2)) -> nn.Module:
    """Orthogonal weights (gain sqrt 2) and zero biases for every ``nn.Linear`` in ``module``."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.orthogonal_(m.weight, gain=gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


def mlp(in_dim: int, hidden: int, depth: int, out_dim: int, layer_norm: bool = False) -> nn.Sequential:
    """``depth`` hidden layers of ``hidden`` units with Mish (and LayerNorm on request), then a linear head."""
    layers: list[nn.Module] = []
    d = in_dim
    for _ in range(depth):
        layers.append(Linear(d, hidden))
        if layer_norm:
            layers.append(nn.LayerNorm(hidden))
        layers.append(Mish())
        d = hidden
    layers.append(Linear(d, out_dim))
    return nn.Sequential(*layers)


class SinusoidalTimestepEmbedding(nn.Module):
    """Sinusoidal embedding of the raw integer step ``n`` (not rescaled to [0, 1]).

    ``emb(n) = [sin(n f_0), ..., sin(n f_{h-1}), cos(n f_0), ..., cos(n f_{h-1})]``
    with ``f_i = exp(-log(10000) i / (h - 1))`` and ``h = dim / 2``.
    """

    def __init__(self, dim: int = 64) -> None:
        super().__init__()
        if dim < 4 or dim % 2:
            raise ValueError(f"embedding dim={dim}: expected an even integer >= 4.")
        half = dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half) / (half - 1))
        self.register_buffer("freqs", freqs, persistent=False)
        self.dim = dim

    def forward(self, n: torch.Tensor) -> torch.Tensor:
        arg = n.to(self.freqs.dtype).unsqueeze(-1) * self.freqs
        return torch.cat([arg.sin(), arg.cos()], -1)


def timestep_embedding(dim: int = 64, hidden: int = 64, out_dim: int = 64) -> nn.Sequential:
    """Sinusoidal embedding followed by ``Linear(hidden)-Mish-Linear(out_dim)-Mish``."""
    return nn.Sequential(SinusoidalTimestepEmbedding(dim), nn.Linear(dim, hidden), Mish(), nn.Linear(hidden, out_dim), Mish())


def _undo_expand(x: torch.Tensor) -> torch.Tensor:
    """``x`` with every dimension it was ``expand``-ed along (stride 0) narrowed to size 1.

    Row-wise functions of the result broadcast back to ``x``'s shape, computed once per distinct row.
    """
    for d in range(x.ndim):
        if x.stride(d) == 0 and x.shape[d] > 1:
            x = x.narrow(d, 0, 1)
    return x


def _broadcast_step(n, batch_shape: torch.Size, device) -> torch.Tensor:
    if isinstance(n, int):
        return torch.full(batch_shape, n, dtype=torch.long, device=device)
    if n.shape != batch_shape:
        n = n.expand(batch_shape)
    return n


def _lookup_rows(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``table[idx]``: rows of ``table`` along dim 0, ``idx`` of any shape; out-of-range rows,
    negative ones included, raise an IndexError (plain indexing would wrap a negative step)."""
    idx = idx.long()
    return table.index_select(0, idx.reshape(-1)).view(*idx.shape, *table.shape[1:])


def _step_rows(table: torch.Tensor, step, *, context: str = "", hint: str = "", batch_shape=None) -> torch.Tensor:
    """Row ``step`` of a per-step ``table`` (``[N + 1, ...]``): an int, or an integer tensor of steps.

    A tensor is first expanded to ``batch_shape`` when given (a view), then looked up once per
    distinct step (expanded dimensions are kept as broadcast ones); steps outside ``[0, N]``
    raise an IndexError. A bad int or dtype raises a ValueError; ``context`` follows ``step=...``
    in its message and ``hint`` follows the expected range.
    """
    if isinstance(step, torch.Tensor):
        if step.dtype == torch.bool or step.is_floating_point() or step.is_complex():
            raise ValueError(f"step has dtype {step.dtype}: expected integer diffusion steps.")
        if batch_shape is not None:
            step = _broadcast_step(step, batch_shape, step.device)
        return _lookup_rows(table, _undo_expand(step))
    last = table.shape[0] - 1
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= last:
        raise ValueError(f"step={step!r}{context}: expected an integer in [0, {last}]{hint} or a long tensor of such steps.")
    return table[step]


class ChainCache(NamedTuple):
    """What the steps of one reverse chain share in an :class:`EpsilonNetwork`'s first layer.

    Attributes:
        time: ``[N + 1, hidden]``, row ``n`` the first layer's response to the time embedding
            of step ``n``, bias included.
        observation: ``[*B, hidden]`` (broadcastable to the actions' batch shape), the first
            layer's response to the observation; ``None`` for an unconditional network.
    """

    time: torch.Tensor
    observation: torch.Tensor | None


class _BodyInParts(nn.Module):
    """A network whose ``body`` (an :func:`mlp`) reads ``concat[...]`` of its inputs, and whose
    first layer can run in parts: the action's columns through :func:`narrow_linear` (this
    network's ``fuse_narrow`` setting, which :func:`set_fuse_narrow_linear` sets), the other
    inputs' products computed where they are cheapest (once per step, once per distinct
    observation) and added. The same values as the plain forward up to float rounding."""

    fuse_narrow: bool | str = False
    body: nn.Sequential
    observation_dim: int

    def _expand_observation(self, observation: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        if observation.shape[:-1] != action.shape[:-1]:
            observation = observation.expand(*action.shape[:-1], self.observation_dim)
        return observation

    def _observation_part(self, observation: torch.Tensor, columns: slice) -> torch.Tensor | None:
        """The first layer's observation columns on each distinct observation (None without any)."""
        if not self.observation_dim:
            return None
        return F.linear(_undo_expand(observation), self.body[0].weight[:, columns])

    def _body_in_parts(self, action: torch.Tensor, columns: slice, *parts, bias: bool = False) -> torch.Tensor:
        """The body with its first layer's action ``columns`` through narrow_linear (with the
        layer's bias when ``bias``), plus the precomputed ``parts`` (None ones skipped)."""
        first = self.body[0]
        h = narrow_linear(action, first.weight[:, columns], first.bias if bias else None, fuse=self.fuse_narrow)
        for part in parts:
            if part is not None:
                h = h + part
        for layer in self.body[1:]:
            h = layer(h)
        return h


class EpsilonNetwork(_BodyInParts):
    """The noise-prediction network ``eps(a^n, n, s)``.

    ``concat[a^n, time_embedding(n), s] -> depth x hidden Mish MLP -> action_dim``.
    Defaults: 4 x 256 (use ``hidden=512`` for antmaze), time embedding of 64 dims.

    Args:
        action_dim (int): dimension of the action ``a``.
        observation_dim (int): dimension of the observation ``s`` (0 for an
            unconditional model; pass ``observation=None`` then).

    Keyword Args:
        hidden (int): hidden width. Defaults to 256.
        depth (int): number of hidden layers. Defaults to 4.
        time_dim (int): time-embedding width. Defaults to 64.

    ``forward(action, step, observation)``: ``action`` is ``[*B, action_dim]``,
    ``step`` an integer or a long tensor of shape ``B``, ``observation``
    ``[*B, observation_dim]``; returns eps of shape ``[*B, action_dim]``.

    A reverse chain evaluates the network ``N`` times at the same observation and at known
    steps: :meth:`chain_cache` computes the time MLP for every step ``0..N`` and the first
    layer's observation part once, and ``forward(action, n, cache=cache)`` (``n`` an int or a
    long tensor) then runs only the action part of the first layer and looks the rest up.
    The result equals the plain forward up to float rounding (the first layer's matmul is
    split in three). :class:`~torchrl_bdpo.diffusion.DiffusionActor` does this for every call.
    """

    def __init__(self, action_dim: int, observation_dim: int, *, hidden: int = 256, depth: int = 4, time_dim: int = 64) -> None:
        super().__init__()
        for name, v in (("action_dim", action_dim), ("observation_dim", observation_dim)):
            if not isinstance(v, int) or v < (1 if name == "action_dim" else 0):
                raise ValueError(f"{name}={v!r}: expected a positive integer.")
        self.action_dim = action_dim
        self.observation_dim = observation_dim
        self.time_dim = time_dim
        self.time_mlp = timestep_embedding(time_dim, time_dim, time_dim)
        self.body = mlp(action_dim + time_dim + observation_dim, hidden, depth, action_dim)
        orthogonal_init_(self)

    def check_inputs(self, action: torch.Tensor, observation: torch.Tensor | None) -> None:
        """Shape checks (cheap, no device sync)."""
        self._check_action(action)
        self._check_observation(observation)

    def _check_action(self, action: torch.Tensor) -> None:
        check_last_dim("action", action, self.action_dim, "Build the EpsilonNetwork with the action dimension of the data (action_dim).")

    def _check_observation(self, observation: torch.Tensor | None) -> None:
        if not self.observation_dim:
            return
        if observation is None:
            raise ValueError(f"observation is None: this EpsilonNetwork was built with observation_dim={self.observation_dim}; pass an observation.")
        check_last_dim(
            "observation", observation, self.observation_dim, "Build the EpsilonNetwork with the observation dimension of the data (observation_dim)."
        )

    def chain_cache(self, observation: torch.Tensor | None, num_steps: int) -> ChainCache:
        """The first layer's time part for steps ``0..num_steps`` and its observation part.

        ``observation`` is ``[*B, observation_dim]`` (``None`` for an unconditional network);
        dimensions it was ``expand``-ed along are computed once and broadcast. Pass the result
        as ``cache=``; the observation part broadcasts against actions of shape ``[*B, action_dim]``
        (unsqueeze it for extra sample dims).
        """
        check_num_steps(num_steps)
        first = self.body[0]
        A, T = self.action_dim, self.time_dim
        steps = torch.arange(num_steps + 1, device=first.weight.device)
        time = F.linear(self.time_mlp(steps), first.weight[:, A : A + T], first.bias)
        self._check_observation(observation)
        return ChainCache(time, self._observation_part(observation, slice(A + T, None)))

    def _forward_cached(self, action: torch.Tensor, step, cache: ChainCache) -> torch.Tensor:
        time = _step_rows(cache.time, step, context=" with a chain cache")
        self._check_action(action)
        return self._body_in_parts(action, slice(0, self.action_dim), time, cache.observation)

    def forward(self, action: torch.Tensor, step, observation: torch.Tensor | None = None, *, cache: ChainCache | None = None) -> torch.Tensor:
        if cache is not None:
            return self._forward_cached(action, step, cache)
        self.check_inputs(action, observation)
        step = _broadcast_step(step, action.shape[:-1], action.device)
        parts = [action, self.time_mlp(step)]
        if self.observation_dim:
            parts.append(self._expand_observation(observation, action))
        return self.body(torch.cat(parts, -1))


class DiffusionValueNetwork(_BodyInParts):
    """The diffusion value ``V(s, a^n, n)`` for ``n >= 1`` (``V_0`` is ``Q``).

    Time branch ``emb(64) -> Linear(128)-Mish-Linear(64)-Mish``; body
    ``concat[s, a^n, t] -> depth x hidden (LayerNorm, Mish) -> 1``.

    ``forward(observation, action, step)`` returns ``[*B, 1]``.

    Keyword Args:
        hidden (int): hidden width. Defaults to 256.
        depth (int): number of hidden layers. Defaults to 3.
        time_dim (int): time-embedding width. Defaults to 64.
        num_steps (int, optional): the number of diffusion steps ``N`` of the policy it values.
            With it, each call runs the time branch and the first layer's time part once per
            step ``0..N`` and looks the rows up (as :meth:`EpsilonNetwork.chain_cache` does), and
            the first layer's observation part once per distinct observation (``expand``-ed
            dimensions, such as BDPO's ``M`` samples per state, are computed once): ~20% fewer
            FLOPs at the D4RL sizes, the same values up to float rounding, the same parameters.
            Steps outside ``[0, N]`` then raise an error. Defaults to ``None`` (the plain forward).
    """

    def __init__(self, observation_dim: int, action_dim: int, *, hidden: int = 256, depth: int = 3, time_dim: int = 64, num_steps: int | None = None) -> None:
        super().__init__()
        if num_steps is not None:
            check_num_steps(num_steps, what="the policy's number of diffusion steps", hint=" Or None for the plain forward.")
        self.action_dim = action_dim
        self.observation_dim = observation_dim
        self.num_steps = num_steps
        self.time_mlp = timestep_embedding(time_dim, 2 * time_dim, time_dim)
        self.body = mlp(observation_dim + action_dim + time_dim, hidden, depth, 1, layer_norm=True)
        orthogonal_init_(self)

    def forward(self, observation: torch.Tensor, action: torch.Tensor, step) -> torch.Tensor:
        check_last_dim("action", action, self.action_dim, "Match the value network's action_dim.")
        check_last_dim("observation", observation, self.observation_dim, "Match the value network's observation_dim.")
        observation = self._expand_observation(observation, action)
        if self.num_steps is not None:
            return self._forward_table(observation, action, step)
        step = _broadcast_step(step, action.shape[:-1], action.device)
        return self.body(torch.cat([observation, action, self.time_mlp(step)], -1))

    def _forward_table(self, observation: torch.Tensor, action: torch.Tensor, step) -> torch.Tensor:
        first = self.body[0]
        O, A = self.observation_dim, self.action_dim
        steps = torch.arange(self.num_steps + 1, device=first.weight.device)
        table = F.linear(self.time_mlp(steps), first.weight[:, O + A :], first.bias)  # [N + 1, hidden]
        # tensor steps expanded to the actions' batch shape, as the plain forward does
        time = _step_rows(table, step, hint=f" (num_steps={self.num_steps})", batch_shape=action.shape[:-1])
        return self._body_in_parts(action, slice(O, O + A), time, self._observation_part(observation, slice(0, O)))


class QValueNetwork(_BodyInParts):
    """``Q(s, a)``: ``concat[s, a] -> depth x hidden Mish (LayerNorm on request) -> 1``."""

    def __init__(self, observation_dim: int, action_dim: int, *, hidden: int = 256, depth: int = 3, layer_norm: bool = False) -> None:
        super().__init__()
        self.action_dim = action_dim
        self.observation_dim = observation_dim
        self.body = mlp(observation_dim + action_dim, hidden, depth, 1, layer_norm=layer_norm)
        orthogonal_init_(self)

    def forward(self, observation: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        check_last_dim("action", action, self.action_dim, "Match the Q network's action_dim.")
        check_last_dim("observation", observation, self.observation_dim, "Match the Q network's observation_dim.")
        # the first layer in two parts: the observation's once per distinct observation (not per
        # sample of an expanded one), the action's (6 features at the D4RL sizes) through narrow_linear
        O = self.observation_dim
        observation = self._expand_observation(observation, action)
        return self._body_in_parts(action, slice(O, None), self._observation_part(observation, slice(0, O)), bias=True)


def make_qvalue_operator(
    observation_dim: int,
    action_dim: int,
    *,
    hidden: int = 256,
    depth: int = 3,
    layer_norm: bool = False,
    in_keys=("observation", "action"),
    out_keys=("state_action_value",),
):
    """``Q(s, a)`` as a TensorDictModule (``observation, action -> state_action_value``)."""
    from tensordict.nn import TensorDictModule

    net = QValueNetwork(observation_dim, action_dim, hidden=hidden, depth=depth, layer_norm=layer_norm)
    return TensorDictModule(net, in_keys=list(in_keys), out_keys=list(out_keys))


def make_value_operator(
    observation_dim: int,
    action_dim: int,
    *,
    hidden: int = 256,
    depth: int = 3,
    num_steps: int | None = None,
    in_keys=("observation", "action", "diffusion_step"),
    out_keys=("diffusion_value",),
):
    """``V(s, a^n, n)`` as a TensorDictModule (``observation, action, diffusion_step -> diffusion_value``).

    Pass the policy's ``num_steps`` for the faster looked-up time branch (see :class:`DiffusionValueNetwork`).
    """
    from tensordict.nn import TensorDictModule

    net = DiffusionValueNetwork(observation_dim, action_dim, hidden=hidden, depth=depth, num_steps=num_steps)
    return TensorDictModule(net, in_keys=list(in_keys), out_keys=list(out_keys))
