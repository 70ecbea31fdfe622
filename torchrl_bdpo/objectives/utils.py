"""Small pure helpers shared by the BDPO losses: ensemble aggregation and calls, target updates."""
from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
from tensordict import TensorDictBase
from torch import nn

AGGREGATIONS = ("lcb", "min", "mean")


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


def make_ensemble_members(
    module: nn.Module | Sequence[nn.Module], size: int, init: Callable[[nn.Module], object] | None
) -> nn.Module | list[nn.Module]:
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


def ensemble_apply(
    module: nn.Module,
    params: TensorDictBase,
    inputs: Sequence[torch.Tensor],
    size: int,
    *,
    use_vmap: bool = True,
) -> torch.Tensor:
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


def chunk_sizes(inputs: Sequence, max_rows: int | None) -> list[int] | None:
    """How to split the leading dim so that each chunk holds at most ``max_rows`` samples.

    A sample is one row of the batch dims (an input ``[B, M, d]`` has ``M`` per leading entry; a
    step input ``[B, M]`` has one). Returns the chunk lengths along the leading dim, near-equal
    (two lengths at most, one when they divide it, so that a compiled chunk is reused), or
    ``None`` when the call is not to be split: no limit, a call that fits, or inputs that are
    not CPU tensors sharing their leading dim.
    """
    if max_rows is None or not inputs:
        return None
    lead, per_entry = None, 1
    for x in inputs:
        if not isinstance(x, torch.Tensor) or x.ndim == 0 or x.device.type != "cpu":
            return None
        if lead is None:
            lead = x.shape[0]
        elif x.shape[0] != lead:
            return None
        if x.ndim >= 2:
            per_entry = max(per_entry, x.shape[1:-1].numel())
    entries = max(1, max_rows // per_entry)
    if lead <= entries:
        return None
    num_chunks = -(-lead // entries)
    size, extra = divmod(lead, num_chunks)
    return [size + 1] * extra + [size] * (num_chunks - extra)


def _ensemble_members(module, params, inputs, size, use_vmap):
    # compiled on its own (not ensemble_apply itself): dynamo keeps its graphs per code object,
    # and ensemble_apply is also traced inside the losses' graphs
    return ensemble_apply(module, params, inputs, size, use_vmap=use_vmap)


_COMPILED_MEMBERS: dict = {}

# Every chunk shape of every chunked call (Q and V, with and without grad, each loss of the
# process) is one static-shape graph of the one function above: a single compiled update needs
# ~5 at the D4RL sizes, two updates in one process (a benchmark's variants) exceed dynamo's
# default limit of 8 per function, after which it would run the remaining chunks eagerly.
CHUNK_RECOMPILE_LIMIT = 64


@torch.compiler.disable
def ensemble_apply_chunked(
    module: nn.Module,
    params: TensorDictBase,
    inputs: Sequence[torch.Tensor],
    size: int,
    sizes: Sequence[int],
    *,
    use_vmap: bool = True,
    compile_options: dict | None = None,
) -> torch.Tensor:
    """:func:`ensemble_apply` on chunks of the inputs' leading dim (``sizes``, from
    :func:`chunk_sizes`), concatenated: ``[size, *out]``.

    The same values as one call, up to float rounding. A CPU runs an ensemble over many rows
    faster this way: each chunk's ``[size, rows, hidden]`` activations stay in its cache instead
    of going through memory between layers. Always eager to ``torch.compile`` (a graph
    break): a compiled caller traces around it. ``compile_options`` (``torch.compile`` keyword
    arguments, ``{}`` for the defaults) compile the per-chunk call itself — one graph, reused by
    every chunk of that shape, up to :data:`CHUNK_RECOMPILE_LIMIT` graphs; ``None`` runs the
    chunks eagerly.
    """
    chunks = zip(*(x.split(list(sizes)) for x in inputs))
    if compile_options is None:
        return torch.cat([_ensemble_members(module, params, xs, size, use_vmap) for xs in chunks], 1)
    key = repr(sorted(compile_options.items()))  # values may be unhashable (an options dict)
    fn = _COMPILED_MEMBERS.get(key)
    if fn is None:
        fn = _COMPILED_MEMBERS[key] = torch.compile(_ensemble_members, dynamic=False, **compile_options)
    limit = max(torch._dynamo.config.recompile_limit, CHUNK_RECOMPILE_LIMIT)
    with torch._dynamo.config.patch(recompile_limit=limit):
        return torch.cat([fn(module, params, xs, size, use_vmap) for xs in chunks], 1)


class TargetSoftUpdate:
    """Exponential moving average of the target parameters of *some* networks of a loss.

    ``target <- (1 - tau) * target + tau * online`` for each name in ``networks``.
    TorchRL's :class:`~torchrl.objectives.SoftUpdate` moves every target of a loss at
    once (and copies online into target when it is built); BDPO moves the critics'
    targets every step but the actor's and the behavior's only after their own
    updates, so each group gets its own updater. Building one changes no parameter.

    Args:
        loss_module (LossModule): the loss holding ``<name>_params`` and ``target_<name>_params``.
        networks (sequence of str): e.g. ``("qvalue_network", "value_network")``.
        tau (float): the EMA rate, in (0, 1]. Defaults to 0.005.
    """

    def __init__(self, loss_module, networks: Sequence[str], tau: float = 0.005) -> None:
        if not 0 < tau <= 1:
            raise ValueError(f"tau={tau!r}: expected a number in (0, 1].")
        self.loss_module = loss_module
        self.networks = tuple(networks)
        self.tau = tau
        self._leaves = None  # (containers, version, targets, onlines): see _current_leaves()
        for name in self.networks:
            if not hasattr(loss_module, f"target_{name}_params"):
                raise ValueError(
                    f"{type(loss_module).__name__} has no target parameters for {name!r}; "
                    f"networks with targets: {sorted(loss_module._has_update_associated)}."
                )
            online, target = self._pair(name)
            online_keys = list(online.keys(include_nested=True, leaves_only=True))
            target_keys = list(target.keys(include_nested=True, leaves_only=True))
            if online_keys != target_keys:  # step() pairs the leaves by position
                raise ValueError(
                    f"{name}_params and target_{name}_params hold different entries (or the same in "
                    f"another order): {online_keys} vs {target_keys}. Build the targets from the online "
                    f"parameters (LossModule.convert_to_functional(..., create_target_params=True))."
                )
            loss_module._has_update_associated[name] = True

    def _pair(self, name: str):
        return getattr(self.loss_module, f"{name}_params"), getattr(self.loss_module, f"target_{name}_params")

    def _current_leaves(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The target and online leaves, cached while they cannot have been replaced.

        Walking the TensorDicts costs ~0.1 ms per step on a CPU for a 4 x 256 MLP, about as
        much as the lerp; the leaves are reused while (a) every ``<name>_params`` and
        ``target_<name>_params`` is the same object and (b) the loss's ``_params_version``
        (counted by our losses' ``_apply``: ``.to``, ``.double``, ...) is unchanged. A loss
        without that counter is walked on every step.
        """
        version = getattr(self.loss_module, "_params_version", None)
        containers = tuple(td for name in self.networks for td in self._pair(name))
        cached = self._leaves
        if (
            version is not None
            and cached is not None
            and cached[1] == version
            and all(a is b for a, b in zip(cached[0], containers))  # self.networks is fixed: same length
        ):
            return cached[2], cached[3]
        targets, onlines = self._walk()
        # the containers are held, so their ids cannot be reused by new objects while cached
        self._leaves = None if version is None else (containers, version, targets, onlines)
        return targets, onlines

    def _walk(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        targets, onlines = [], []
        for name in self.networks:
            online, target = self._pair(name)
            o = list(online.values(include_nested=True, leaves_only=True))  # read only (no_grad)
            t = [p.data for p in target.values(include_nested=True, leaves_only=True)]  # as before: no version bump
            if len(o) != len(t):
                raise RuntimeError(
                    f"{name}_params has {len(o)} entries but target_{name}_params {len(t)}: the "
                    f"parameters were replaced after this TargetSoftUpdate was built; build a new one."
                )
            onlines += o
            targets += t
        return targets, onlines

    @torch.no_grad()
    def step(self) -> None:
        # one fused lerp over every leaf of every network: ``target.data.lerp_(online.data)``
        # on the TensorDicts builds two detached TensorDicts per network first, which costs
        # more than the lerp itself for a 4 x 256 MLP (~0.8 ms against ~0.35 ms per step on a CPU)
        targets, onlines = self._current_leaves()
        if targets:
            torch._foreach_lerp_(targets, onlines, self.tau)

    @torch.no_grad()
    def hard_update(self) -> None:
        """Copy online into target (``tau = 1``)."""
        for name in self.networks:
            online, target = self._pair(name)
            if not online.is_empty():
                target.data.copy_(online.data)


def unwrap_exploration_wrappers(cls):
    """Class decorator: undo TorchRL's per-method exploration-type wrapper on ``cls``'s own methods.

    TorchRL's ``LossModule`` metaclass wraps ``forward`` and every public ``*_loss`` method
    in one shared function that sets ``ExplorationType.DETERMINISTIC``. Our losses draw
    every diffusion sample explicitly and never read the exploration type, so the wrapper
    does nothing for them; but because all wrapped methods share one code object, torch
    2.13's dynamo fails to build guards (``NameError: SYNTHETIC_LOCAL``) when a compiled
    update inlines several of them. Removing it keeps ``torch.compile`` of a full update working.
    """
    for name, value in list(vars(cls).items()):
        if (name == "forward" or (not name.startswith("_") and name.endswith("loss"))) and hasattr(value, "__wrapped__"):
            setattr(cls, name, value.__wrapped__)
    return cls


class MovesSchedules:
    """Mixin for losses: ``loss.to(device)`` also moves the noise schedules of its diffusion models.

    TorchRL keeps a loss's networks outside its module tree (in ``__dict__``): ``loss.to``
    moves their parameters and buffers held in ``*_params`` but not the module's own
    tensors. The schedule's tables are read outside ``to_module`` contexts (noising a
    dataset action, the step KL), so they must follow the loss.

    Each such call also increments ``_params_version``: it may have replaced the tensors of
    ``*_params``, and :class:`TargetSoftUpdate` caches those between calls.
    """

    _params_version = 0

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._params_version += 1
        from torchrl_bdpo.diffusion.actor import DiffusionActor

        seen = set()
        for value in list(self.__dict__.values()):
            if isinstance(value, DiffusionActor) and id(value.schedule) not in seen:
                seen.add(id(value.schedule))
                value.schedule._apply(fn)
        return out

