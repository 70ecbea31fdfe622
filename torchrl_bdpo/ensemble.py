"""Ensembles of critics: calls over the members (vmap, or a loop), row chunks, aggregation.

A lower layer: the losses (``objectives``) and best-of-K acting (``diffusion.select``) both use it.
"""
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
