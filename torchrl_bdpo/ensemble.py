"""Ensembles of critics: calls over the members (vmap, or a loop), aggregation.

Row chunks for a CPU's cache are speed work: :mod:`torchrl_bdpo.speed.chunks`.

A lower layer: the losses (``objectives``) and best-of-K acting (``diffusion.select``) both use it.
"""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
from tensordict import TensorDictBase
from torch import nn

AGGREGATIONS = ("lcb", "min", "mean")


def check_aggregation(aggregation: str, rho: float, prefix: str = "", rho_name: str = "rho") -> None:
    """Raise a ``ValueError`` that names the value for an unknown ``aggregation``, a ``rho`` that is
    not a finite number >= 0, or a non-zero ``rho`` with a rule that ignores it (only ``lcb`` reads it).

    ``prefix`` goes before both names in the message (``"eval."`` for a script's config keys);
    ``rho_name`` is the weight's own name (``"qvalue_target_rho"`` for the Q target's).
    """
    agg, r = f"{prefix}aggregation", f"{prefix}{rho_name}"
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"{agg}={aggregation!r}: expected one of {AGGREGATIONS}.")
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not rho >= 0 or rho == float("inf"):
        raise ValueError(f"{r}={rho!r}: expected a finite number >= 0 (the LCB's weight on the ensemble's std; 0 makes the LCB the mean).")
    if rho != 0 and aggregation != "lcb":
        raise ValueError(f"{r}={rho!r} with {agg}={aggregation!r}: {rho_name} weighs the std of {agg}='lcb' only; set {agg}=lcb or {r}=0.")


def check_pessimism_share(share: float, aggregation: str, rho: float | None = None, prefix: str = "") -> None:
    """Raise a ``ValueError`` that names the value for a Q-target pessimism share that is not a
    number in [0, 1), an aggregation other than ``lcb``, or a fixed Q-target weight ``rho`` given too."""
    name = f"{prefix}qvalue_target_pessimism"
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share < 1:
        raise ValueError(
            f"{name}={share!r}: expected a number in [0, 1), the share of the reward per step that the Q "
            f"target's pessimism costs (0.5 halves Q's fixed point; 1 would take all of it)."
        )
    if aggregation != "lcb":
        raise ValueError(
            f"{name}={share!r} with {prefix}aggregation={aggregation!r}: it sets the weight of the std of "
            f"{prefix}aggregation='lcb' only; set {prefix}aggregation=lcb."
        )
    if rho is not None:
        raise ValueError(
            f"{name}={share!r} and {prefix}qvalue_target_rho={rho!r} both set the Q target's LCB weight: "
            f"choose one (set {prefix}qvalue_target_rho to null / None)."
        )


def adaptive_lcb_weight(spread: torch.Tensor, reward: torch.Tensor, gamma: float, share: float, live: torch.Tensor | None = None) -> torch.Tensor:
    """The LCB weight ``rho`` with ``gamma rho mean(spread) = share mean|reward|``, a 0-dim tensor.

    ``spread`` is the ensemble's std per next state; ``live`` (0 / 1, the same shape) keeps the
    mean to the states that bootstrap. A zero spread, or no live state, gives a finite weight
    (the LCB then equals the mean), so that masked rows stay finite.
    """
    if live is None:
        mean_spread = spread.mean()
    else:
        mean_spread = (spread * live).sum() / live.sum().clamp_min(1)
    return share * reward.abs().mean() / (gamma * mean_spread).clamp_min(1e-12)


def aggregate_ensemble(values: torch.Tensor, aggregation: str = "lcb", rho: float = 0.0, dim: int = 0) -> torch.Tensor:
    """Reduce the ensemble dim: ``lcb`` = mean - rho * std (population std), ``min`` or ``mean``."""
    if aggregation == "lcb":
        mean = values.mean(dim)
        if rho == 0:
            return mean
        return mean - rho * values.std(dim, correction=0)
    if aggregation == "min":
        return values.min(dim).values
    if aggregation == "mean":
        return values.mean(dim)
    raise ValueError(f"aggregation={aggregation!r}: expected one of {AGGREGATIONS}.")


def has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def make_ensemble_members(module: nn.Module | Sequence[nn.Module], size: int, init: Callable[[nn.Module], object] | None) -> nn.Module | list[nn.Module]:
    """``size`` independently initialised copies of ``module`` (or the given list, unchanged).

    TorchRL's ``convert_to_functional(expand_dim=K)`` resamples each parameter uniformly
    between its min and max, which discards the reference implementation's orthogonal
    init. Copies re-initialised by ``init`` keep it. Parameter-free modules (a fixed
    reward, say) are returned as they are.
    """
    if isinstance(module, (list, tuple)):
        if len(module) != size:
            raise ValueError(f"got {len(module)} ensemble members but num_qvalue_nets={size}.")
        return list(module)
    if not has_parameters(module):
        return module
    members = [copy.deepcopy(module) for _ in range(size)]
    if init is not None:
        for m in members:
            init(m)
    return members


def ensemble_apply(module: nn.Module, params: TensorDictBase, inputs: Sequence[torch.Tensor], size: int, *, use_vmap: bool = True) -> torch.Tensor:
    """``module.module(*inputs)`` under each member of ``params`` (leading dim ``size``): ``[size, *out]``.

    The inputs are shared by all members. A parameter-free module is called once and
    broadcast across the ensemble.
    """
    inner = getattr(module, "module", module)
    if params.is_empty():
        out = inner(*inputs)
        return out.unsqueeze(0).expand(size, *out.shape)

    def call(p, *xs):
        with p.to_module(module, preserve_module_state=False):
            return inner(*xs)

    if use_vmap:
        in_dims = (0,) + (None,) * len(inputs)
        return torch.vmap(call, in_dims, randomness="different")(params, *inputs)
    return torch.stack([call(params[i], *inputs) for i in range(size)], 0)
